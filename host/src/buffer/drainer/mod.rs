//! The drainer: republishes spool entries in stream order through a
//! publisher it is given, and deletes each entry only after its publish was
//! confirmed.
//!
//! # One drainer per stream: a lease, not a consumer group
//! Order needs a single reader that stops at the first failure. A consumer
//! group would add a pending-entries list, `XACK`, and `XAUTOCLAIM` to take
//! over a dead drainer's entries — and claiming reorders them. Instead the
//! drainer holds a lease (`{stream}:drain-lock`, set with `NX PX`, renewed
//! every third of its TTL by a compare-and-extend script) and always reads
//! from the head of the stream. Entries are deleted strictly in stream
//! order, so the stream is always "everything not yet confirmed": a drainer
//! that crashes or is cancelled mid-way leaves its unconfirmed entries where
//! they were, and the next lease holder republishes them (at least once).
//! Before each publish the drainer checks that its lease is still valid, so
//! two hosts do not publish the same entries concurrently (barring a Redis
//! failover losing the lock key, or a drainer stalled longer than the TTL
//! between that check and its publish).
//!
//! # A window of publishes in flight
//! [`DrainPublisher::publish`] has two phases: its future resolves once the
//! message is handed to the broker (sent in call order), and yields a
//! confirm future that resolves at the broker's confirm. The drainer keeps
//! up to `window` confirms outstanding and consumes them in order, deleting
//! the confirmed prefix in batches (one script call: `XDEL` and the byte
//! counter). On the first failed publish or confirm it stops sending,
//! deletes the confirmed prefix before the failed entry, and pauses with
//! exponential backoff (full jitter); the failed entry and everything after
//! it stay in the stream and are republished from there. With a window
//! larger than 1, entries after the failed one may already have reached the
//! broker; they are published again after it (duplicates, carrying the same
//! `message_id`). `window = 1` gives strict order even across failures.
//!
//! A Redis failure mid-pass (a read, a delete, a lease renewal; e.g.
//! `NOREPLICAS` while the replicas lag) also stops the sending, but the
//! confirms in flight are still awaited, and confirmed entries Redis could
//! not delete are kept and deleted before the next pass reads: a Redis
//! failure never republishes what the broker confirmed (dropping them
//! would cost a window of duplicates per Redis hiccup).
//!
//! # Slow is not failed
//! A failure is a publish that fails, or no progress — no send completing
//! and no confirm arriving — for `stall_timeout_ms` while publishes are in
//! flight and the broker is not blocking publishes (`connection.blocked`:
//! the broker is alive and said why it is slow). It is never a confirm
//! that arrives later than some deadline counted from its own send:
//! through a slow broker the tail of a full window is confirmed many
//! timeouts after it was sent while every confirm before it arrives on
//! time, and giving up on that tail would pause and republish it (all
//! duplicates) on every pass, so a backlog would never drain. A stall
//! timeout shorter than the broker's pauses (a disk stalling an fsync)
//! does the same: every pause fails the pass and republishes its window.
//! A dead connection is noticed by the heartbeat, which fails every
//! confirm in flight; the stall timeout is the last resort for a confirm
//! that never comes on a live connection, so it is long (Warren's default
//! is 30 s).
//!
//! For the same reason the backoff restarts from its minimum after a pass
//! that deleted something (a drainer that makes progress is not retrying a
//! dead broker), and the window adapts: each failed pass halves it (what a
//! failure can leave routed but unconfirmed, to be published again), a
//! window's worth of confirms in a row doubles it back up to `window`. A
//! broker that keeps failing passes then costs duplicates in proportion to
//! the progress it allows, not a full window each time.
//!
//! An entry that cannot be decoded is moved to `{stream}:corrupt` (logged at
//! ERROR) rather than blocking the spool forever.
//!
//! Deliberately not done here: routing decisions (the outbox decides when to
//! spool), and AMQP itself (the publisher is given).

mod pass;
mod publisher;
mod record;
mod stream;
mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::error::RedisFailure;
use super::spool::{Shared, SpoolHandle};
use super::{DrainerConfig, SpoolError};
use crate::backoff::{Backoff, BackoffConfig};
use crate::message::OutboundMessage;
use pass::{DrainPass, Pass, Settle};
pub use publisher::{DrainPublisher, DrainerHandle, FnPublisher};
pub(crate) use record::DrainRecord;
pub use record::{DrainStats, DrainerState};
use stream::{DeleteFailed, Entry};
use window::DrainWindow;

/// Owner of the drain loop. `drainer.run(cancel)`; control it through the
/// [`DrainerHandle`].
pub struct Drainer<P: DrainPublisher> {
    cfg: DrainerConfig,
    shared: Arc<Shared>,
    publisher: P,
    enabled: watch::Receiver<bool>,
    lock_key: String,
    corrupt_key: String,
    /// Set when draining another host's stream: that host's claim, whose
    /// presence ends the lease (see `buffer::adopt`).
    owner_key: Option<String>,
    token: String,
    /// Confirms awaited at once now (at most `cfg.window`).
    window: DrainWindow,
    /// Confirmed entries a failed delete left in the stream; deleted before
    /// the next pass reads.
    unsettled: Vec<Entry>,
}

/// How one attempt to drain an adopted stream ended.
#[derive(Debug)]
pub(crate) enum Adopted {
    /// Empty: everything was republished and deleted.
    Drained,
    /// Not ours to drain: the owner is back or another host holds the lease.
    Declined,
    /// Stopped part-way (cancelled, paused, a failure); what is left stays
    /// in the stream for the next attempt.
    Interrupted(Option<String>),
}

pub(super) enum Stop {
    Cancelled,
    Disabled,
    LeaseLost,
    Idle,
    /// A publish failed or stalled.
    Publish(String),
    Redis(RedisFailure),
}

impl<P: DrainPublisher> Drainer<P> {
    /// A drainer for `spool`'s stream publishing through `publisher`.
    pub fn new(
        cfg: DrainerConfig,
        spool: &SpoolHandle,
        publisher: P,
    ) -> Result<(Drainer<P>, DrainerHandle), SpoolError> {
        cfg.validate()?;
        let shared = spool.shared.clone();
        let (tx, rx) = watch::channel(true);
        Ok((
            Drainer::for_stream(cfg, shared.clone(), publisher, rx, None),
            DrainerHandle {
                enabled: tx,
                shared,
            },
        ))
    }

    /// A drainer of `shared`'s stream; `owner_key` is set for an adopted
    /// stream.
    fn for_stream(
        cfg: DrainerConfig,
        shared: Arc<Shared>,
        publisher: P,
        enabled: watch::Receiver<bool>,
        owner_key: Option<String>,
    ) -> Drainer<P> {
        let window = DrainWindow::new(cfg.window);
        shared.drain.set_window(window.size());
        let key = shared.key.clone();
        Drainer {
            cfg,
            shared,
            publisher,
            enabled,
            lock_key: format!("{key}:drain-lock"),
            corrupt_key: format!("{key}:corrupt"),
            owner_key,
            token: Uuid::new_v4().to_string(),
            window,
            unsettled: Vec::new(),
        }
    }

    /// A drainer for an adopted stream: its lease is refused, and ends,
    /// while the owner's claim `owner_key` exists.
    pub(crate) fn adopting(
        cfg: DrainerConfig,
        stream: Arc<Shared>,
        publisher: P,
        enabled: watch::Receiver<bool>,
        owner_key: String,
    ) -> Drainer<P> {
        Drainer::for_stream(cfg, stream, publisher, enabled, Some(owner_key))
    }

    /// Drain an adopted stream once, from its head until it is empty: take
    /// the lease (refused while the owner's claim exists or another host
    /// holds it), publish, release. Returns the publisher, for the next
    /// stream, and what happened.
    pub(crate) async fn run_adopted(mut self, cancel: &CancellationToken) -> (P, Adopted) {
        let outcome = match self.extend_lease().await {
            Ok(false) => Adopted::Declined,
            Err(failure) => self.redis_failure(failure).await,
            Ok(true) => {
                let mut lease = Lease::held(self.ttl()).await;
                match self.drain_pass(cancel, &mut lease).await {
                    Stop::Idle => Adopted::Drained,
                    Stop::LeaseLost => Adopted::Declined,
                    Stop::Cancelled | Stop::Disabled => Adopted::Interrupted(None),
                    Stop::Publish(error) => Adopted::Interrupted(Some(error)),
                    Stop::Redis(failure) => self.redis_failure(failure).await,
                }
            }
        };
        self.release_lease().await;
        (self.publisher, outcome)
    }

    async fn redis_failure(&self, failure: RedisFailure) -> Adopted {
        failure.repair(&self.shared.primary).await;
        Adopted::Interrupted(Some(failure.error.to_string()))
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.lease_ttl_ms)
    }

    /// A failed pass gave publishes up: halve the window (see `window`).
    fn shrink_window(&mut self) {
        if self.window.shrink() {
            debug!(stream = %self.shared.key, window = self.window.size(), "Drain window halved after a failed pass.");
        }
        self.shared.drain.set_window(self.window.size());
    }

    /// A confirm arrived: the window may double back (see `window`).
    fn grow_window(&mut self) {
        if self.window.confirmed() {
            self.shared.drain.set_window(self.window.size());
        }
    }

    /// Drain until `cancel`. Never returns early on errors: failures pause
    /// and retry.
    pub async fn run(mut self, cancel: CancellationToken) {
        info!(stream = %self.shared.key, token = %self.token, "Drainer starting.");
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(self.cfg.backoff_min_ms),
            max: Duration::from_millis(self.cfg.backoff_max_ms),
        });
        while !cancel.is_cancelled() {
            let drained_before = self.shared.drained_total();
            if !*self.enabled.borrow_and_update() {
                self.shared.drain.set_state(DrainerState::Disabled);
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    r = self.enabled.changed() => if r.is_err() { break },
                }
                continue;
            }
            let stop = match self.extend_lease().await {
                Ok(true) => {
                    debug!(stream = %self.shared.key, "Drain lease held.");
                    self.drain_leased(&cancel, &mut backoff).await
                }
                Ok(false) => {
                    // Another host holds the lease: try again one renewal
                    // period later.
                    self.shared.drain.set_state(DrainerState::Standby);
                    if sleep_unless_cancelled(&cancel, self.ttl() / 3).await {
                        continue;
                    }
                    break;
                }
                Err(failure) => Stop::Redis(failure),
            };
            // `None` goes round again; a cancelled pass ends the loop by its
            // condition.
            let Some(pause) = self.pause_reason(stop).await else {
                continue;
            };
            self.shared.drain.paused(&pause);
            if self.shared.drained_total() > drained_before {
                // Progress before the failure: not a dead broker.
                backoff.reset();
            }
            let wait = backoff.next_delay_at_least(Duration::from_millis(self.cfg.backoff_min_ms));
            if !self.pause(&cancel, pause, wait).await {
                break;
            }
        }
        self.release_lease().await;
        self.shared.drain.set_state(DrainerState::NotRunning);
        info!(stream = %self.shared.key, "Drainer stopped.");
    }

    /// What ended a leased stretch, as `run` sees it: the error to pause on,
    /// or `None` when there is nothing to wait out.
    async fn pause_reason(&mut self, stop: Stop) -> Option<String> {
        match stop {
            Stop::Cancelled | Stop::Idle => None,
            Stop::Disabled => {
                self.release_lease().await;
                None
            }
            Stop::LeaseLost => {
                warn!(stream = %self.shared.key, "Drain lease lost; standing by.");
                None
            }
            Stop::Publish(error) => {
                warn!(stream = %self.shared.key, %error, window = self.window.size(), "Republishing a spooled message failed; pausing the drainer.");
                Some(error)
            }
            Stop::Redis(failure) => {
                failure.repair(&self.shared.primary).await;
                warn!(stream = %self.shared.key, error = %failure.error, "Drainer cannot reach Redis; pausing.");
                Some(failure.error.to_string())
            }
        }
    }

    /// After a failed pass: wait `wait`, showing why, or until the broker
    /// may take publishes again ([`DrainerHandle::kick`]): a pause waits
    /// out a broker that failed, never one that came back. False when
    /// `cancel` fired first.
    async fn pause(&self, cancel: &CancellationToken, error: String, wait: Duration) -> bool {
        self.shared.drain.set_state(DrainerState::Paused {
            error,
            retry_in_ms: wait.as_millis() as u64,
        });
        metrics::counter!(super::metric::DRAIN_PAUSES).increment(1);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = self.shared.drain.wake.notified() => {
                debug!(stream = %self.shared.key, "The broker is back; ending the drain pause.");
                true
            }
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Holding the lease: drain, idle, renew, until something stops us.
    async fn drain_leased(&mut self, cancel: &CancellationToken, backoff: &mut Backoff) -> Stop {
        let mut lease = Lease::held(self.ttl()).await;
        loop {
            match self.drain_pass(cancel, &mut lease).await {
                Stop::Idle => {}
                other => return other,
            }
            backoff.reset();
            self.shared.drain.set_state(DrainerState::Idle);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Stop::Cancelled,
                r = self.enabled.changed() => {
                    if r.is_err() || !*self.enabled.borrow_and_update() {
                        return Stop::Disabled;
                    }
                }
                _ = lease.renew.tick() => {
                    if let Err(stop) = self.renew_lease(&mut lease).await {
                        return stop;
                    }
                }
                _ = self.shared.appended_notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(self.cfg.idle_poll_ms)) => {}
            }
        }
    }

    /// Extend the lease held in `lease`; the [`Stop`] when it was lost or
    /// Redis failed.
    async fn renew_lease(&self, lease: &mut Lease) -> Result<(), Stop> {
        match self.extend_lease().await {
            Ok(true) => {
                lease.until = Instant::now() + self.ttl();
                Ok(())
            }
            Ok(false) => Err(Stop::LeaseLost),
            Err(failure) => Err(Stop::Redis(failure)),
        }
    }

    /// Publish from the head of the stream until it is empty or something
    /// fails. Returns `Stop::Idle` when everything read was confirmed and
    /// deleted and the stream had no more.
    ///
    /// Reads (the next `XRANGE` page) and deletes (of the confirmed prefix)
    /// run alongside the publishes, one of each at a time, so neither stalls
    /// the window.
    async fn drain_pass(&mut self, cancel: &CancellationToken, lease: &mut Lease) -> Stop {
        // Entries confirmed by an earlier pass but not deleted (Redis
        // failed): delete them before reading, or they would be read and
        // published again.
        if let Err(failure) = self.delete_unsettled().await {
            return Stop::Redis(failure);
        }
        self.publisher.begin_pass();
        DrainPass::new(self, cancel, lease).run().await
    }

    /// Hand `msg` to the publisher; fails on an error or when the send makes
    /// no progress for `stall` while the broker is not blocking publishes.
    async fn send(&self, msg: OutboundMessage, stall: Duration) -> Result<P::Confirm, String> {
        let send = self.publisher.publish(msg);
        tokio::pin!(send);
        loop {
            match tokio::time::timeout(stall, &mut send).await {
                Ok(sent) => return sent.map_err(|e| e.to_string()),
                Err(_) if self.publisher.is_blocked() => {}
                Err(_) => {
                    self.publisher.stalled();
                    return Err(format!("a send made no progress for {stall:?}"));
                }
            }
        }
    }

    /// End a pass with `stop`. With [`Settle::Collect`], first await the
    /// confirms still in flight (no more sends: in order, up to the first
    /// failure, for as long as they keep coming); then finish the delete in
    /// flight and delete everything confirmed. What Redis cannot delete now
    /// is kept for the next pass, so a Redis failure never republishes a
    /// confirmed entry. Publishes given up without an outcome (the broker
    /// may have routed them; they come again) halve the window.
    async fn finish(&mut self, stop: Stop, mut pass: Pass<P::Error>, settle: Settle) -> Stop {
        let abandoned = match settle {
            Settle::Drop => 0,
            Settle::Abandon(n) => n,
            Settle::Collect => {
                let stall = Duration::from_millis(self.cfg.stall_timeout_ms);
                loop {
                    match tokio::time::timeout(stall, pass.inflight.next()).await {
                        Ok(None) => break 0,
                        Ok(Some((entry, Ok(())))) => pass.confirmed.push(entry),
                        Ok(Some((_, Err(_)))) => break pass.inflight.len() + 1,
                        Err(_) => {
                            self.publisher.stalled();
                            break pass.inflight.len();
                        }
                    }
                }
            }
        };
        if abandoned > 0 {
            self.shrink_window();
        }
        let mut failure = None;
        if let Some(d) = pass.deleting {
            match tokio::time::timeout(Duration::from_secs(5), d).await {
                Ok(Ok(())) => {}
                Ok(Err(DeleteFailed {
                    failure: f,
                    entries,
                })) => {
                    self.unsettled.extend(entries);
                    failure = Some(f);
                }
                // Unknown outcome: the entries may be deleted or not; if
                // not, they are read and published again (at least once).
                Err(_) => {}
            }
        }
        self.unsettled.extend(pass.confirmed);
        if failure.is_none() {
            failure = self.delete_unsettled().await.err();
        }
        match (stop, failure) {
            (Stop::Cancelled, _) => Stop::Cancelled,
            (stop, None) => stop,
            (_, Some(failure)) => Stop::Redis(failure),
        }
    }
}

/// A lease this drainer holds: when it runs out unless renewed, and the
/// timer that renews it every third of its TTL.
pub(super) struct Lease {
    pub(super) until: Instant,
    pub(super) renew: tokio::time::Interval,
}

impl Lease {
    /// A lease just taken or extended for `ttl`.
    async fn held(ttl: Duration) -> Lease {
        let until = Instant::now() + ttl;
        let mut renew = tokio::time::interval(ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the lease was just extended.
        renew.tick().await;
        Lease { until, renew }
    }
}

/// Sleep for `d`; false when `cancel` fired first.
async fn sleep_unless_cancelled(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
