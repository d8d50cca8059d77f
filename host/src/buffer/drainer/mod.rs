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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use redis::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};
use uuid::Uuid;

use super::spool::{DrainerState, Shared, SpoolHandle, refresh_depth};
use super::{DrainerConfig, SpoolError};
use crate::backoff::{Backoff, BackoffConfig};
use crate::message::OutboundMessage;

/// The lease script's body: take the lease if nobody holds it, extend it
/// if this drainer does (KEYS[1] the lease, ARGV[1] the token, ARGV[2] the
/// TTL in ms).
macro_rules! lease_body {
    () => {
        r"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"
    };
}

/// Extends the lease if this drainer holds it or nobody does.
const LEASE_SCRIPT: &str = lease_body!();

/// [`LEASE_SCRIPT`] for an adopted stream: refused while its owner's claim
/// (KEYS[2]) exists, so an owner that comes back is never raced.
const ADOPT_LEASE_SCRIPT: &str = concat!(
    "if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end",
    lease_body!()
);

/// Releases the lease if this drainer holds it.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Deletes confirmed entries (id, size pairs) and subtracts the sizes of
/// those that still existed from the byte counter, which never goes below
/// zero: an entry Warren did not write (moved aside as corrupt) was never
/// added to it. Returns {deleted, bytes}.
const DELETE_SCRIPT: &str = r"
local n = 0
local b = 0
for i = 1, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    n = n + 1
    b = b + tonumber(ARGV[i + 1])
  end
end
if b > 0 then
  local left = redis.call('DECRBY', KEYS[2], b)
  if left < 0 then redis.call('SET', KEYS[2], 0) end
end
return {n, b}
";

/// Publishes a spooled message. Implemented by the confirmed AMQP publisher
/// (plugged in by `dispatch`) and by [`FnPublisher`] for a plain async
/// closure.
pub trait DrainPublisher: Send + Sync + 'static {
    /// Why a publish failed.
    type Error: std::fmt::Display + Send + 'static;
    /// Resolves when the broker confirmed (`Ok`) or refused/lost the message.
    type Confirm: Future<Output = Result<(), Self::Error>> + Send + 'static;

    /// Hand `message` to the broker. The drainer awaits these one at a time,
    /// in stream order, so the returned future must resolve once the message
    /// is sent (not confirmed); the confirm comes through
    /// [`DrainPublisher::Confirm`].
    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, Self::Error>> + Send;

    /// Whether the broker has said it is holding publishes back (AMQP
    /// `connection.blocked`, a resource alarm). Time spent blocked is not a
    /// stall (see the module doc, "Slow is not failed"): publishing again
    /// would only queue behind the same alarm.
    fn is_blocked(&self) -> bool {
        false
    }

    /// A pass starts: what follows is sent from the first unconfirmed entry
    /// on. A pipelined publisher keeps one pass on one channel (see
    /// `Publisher::send_unbounded`).
    fn begin_pass(&self) {}

    /// The publishes in flight made no progress for the stall timeout while
    /// the broker did not say it was blocking them: whatever carries them
    /// is suspect. A pipelined publisher replaces its channel (a channel
    /// that lost track of a confirm would stall every pass after this one).
    fn stalled(&self) {}
}

/// Adapts an async closure `Fn(OutboundMessage) -> Future<Output =
/// Result<(), E>>` whose future resolves at the confirm: one publish in
/// flight at a time.
pub struct FnPublisher<F>(pub F);

impl<F, Fut, E> DrainPublisher for FnPublisher<F>
where
    F: Fn(OutboundMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    type Error = E;
    type Confirm = std::future::Ready<Result<(), E>>;

    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, E>> + Send {
        let fut = (self.0)(message);
        async move {
            fut.await?;
            Ok(std::future::ready(Ok(())))
        }
    }
}

/// Controls a running [`Drainer`].
#[derive(Clone)]
pub struct DrainerHandle {
    enabled: watch::Sender<bool>,
    shared: Arc<Shared>,
}

impl DrainerHandle {
    /// Stop draining (e.g. while the broker is known to be down). Publishes
    /// in flight finish; the lease is released.
    pub fn pause(&self) {
        self.enabled.send_replace(false);
    }

    /// Resume draining.
    pub fn resume(&self) {
        self.enabled.send_replace(true);
        self.shared.appended_notify.notify_one();
    }

    /// Retry now instead of waiting out the current backoff: the broker
    /// connection came back (a new session) or stopped blocking publishes.
    /// A kick while no pause is under way ends the next one at once.
    pub fn kick(&self) {
        self.shared.wake.notify_one();
        self.shared.appended_notify.notify_one();
    }

    /// Follow this drainer's pause and resume (the adopter does).
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.enabled.subscribe()
    }
}

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
    window: usize,
    /// Confirms since `window` last changed.
    confirms_at_window: usize,
    /// Confirmed entries a failed delete left in the stream; deleted before
    /// the next pass reads.
    unsettled: Vec<Entry>,
}

type ConfirmFuture<E> = Pin<Box<dyn Future<Output = (Entry, Result<(), E>)> + Send>>;

struct Entry {
    stream_id: String,
    size: u64,
}

type ReadResult = Result<Vec<(Entry, Result<OutboundMessage, String>)>, (SpoolError, u64)>;
/// On failure the entries come back, to be deleted later.
type DeleteResult = Result<(), (SpoolError, u64, Vec<Entry>)>;

/// A pass's publishes awaiting their confirm, the confirmed prefix not yet
/// deleted, and the delete in flight.
struct Pass<E> {
    inflight: FuturesOrdered<ConfirmFuture<E>>,
    confirmed: Vec<Entry>,
    deleting: Option<BoxFuture<'static, DeleteResult>>,
}

/// What ending a pass does with the publishes still in flight.
enum Settle {
    /// Await their confirms (no more sends) while they keep coming.
    Collect,
    /// Give them up: this many may have been routed and come again.
    Abandon(usize),
    /// Drop them (cancelled): they stay in the stream, republished later.
    Drop,
}

/// Await an optional future; pending forever when there is none (the
/// `select!` branch is disabled then anyway).
async fn poll_opt<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Read up to `count` entries after `after` (from the head if `None`).
async fn read_entries(shared: Arc<Shared>, after: Option<String>, count: usize) -> ReadResult {
    let link = shared.primary.get().await.map_err(|e| (e, 0))?;
    let mut conn = link.conn();
    let start = after
        .as_deref()
        .map_or_else(|| "-".to_owned(), |a| format!("({a}"));
    let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(&shared.key)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn)
        .await
        .map_err(|e| (SpoolError::from_redis(&link.addr, e), link.generation))?;
    if raw.is_empty() && after.is_none() {
        // Nothing at all: resynchronise the cheap depth counter.
        refresh_depth(&shared, &link).await;
    }
    Ok(raw
        .into_iter()
        .map(|(stream_id, fields)| {
            let mut m = None;
            for kv in fields.chunks(2) {
                if let [k, v] = kv
                    && k.as_slice() == b"m"
                {
                    m = Some(v.clone());
                }
            }
            let size = m.as_ref().map_or(0, |v| v.len() as u64);
            let msg = match m {
                Some(bytes) => serde_json::from_slice::<OutboundMessage>(&bytes)
                    .map_err(|e| format!("undecodable message: {e}")),
                None => Err("no `m` field".to_owned()),
            };
            (Entry { stream_id, size }, msg)
        })
        .collect())
}

/// Delete confirmed entries (one script call) and account for them.
async fn delete_entries(shared: Arc<Shared>, confirmed: Vec<Entry>) -> DeleteResult {
    if confirmed.is_empty() {
        return Ok(());
    }
    let link = match shared.primary.get().await {
        Ok(link) => link,
        Err(e) => return Err((e, 0, confirmed)),
    };
    let mut conn = link.conn();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(DELETE_SCRIPT)
        .arg(2)
        .arg(&shared.key)
        .arg(&shared.bytes_key);
    for e in &confirmed {
        cmd.arg(&e.stream_id).arg(e.size);
    }
    let mutation = shared.begin_mutation();
    let reply: Result<(u64, u64), _> = cmd.query_async(&mut conn).await;
    let result = match reply {
        Ok((deleted, bytes)) => {
            shared.record_drained(confirmed.len() as u64, deleted, bytes);
            Ok(())
        }
        Err(e) => Err((
            SpoolError::from_redis(&link.addr, e),
            link.generation,
            confirmed,
        )),
    };
    drop(mutation);
    result
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

enum Stop {
    Cancelled,
    Disabled,
    LeaseLost,
    Idle,
    /// A publish failed or stalled.
    Publish(String),
    Redis(SpoolError, u64),
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
        let window = cfg.window;
        shared.set_drain_window(window);
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
            confirms_at_window: 0,
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
            Err((e, g)) => self.redis_failure(e, g).await,
            Ok(true) => {
                let mut lease = Lease::held(self.ttl()).await;
                match self.drain_pass(cancel, &mut lease).await {
                    Stop::Idle => Adopted::Drained,
                    Stop::LeaseLost => Adopted::Declined,
                    Stop::Cancelled | Stop::Disabled => Adopted::Interrupted(None),
                    Stop::Publish(error) => Adopted::Interrupted(Some(error)),
                    Stop::Redis(e, g) => self.redis_failure(e, g).await,
                }
            }
        };
        self.release_lease().await;
        (self.publisher, outcome)
    }

    async fn redis_failure(&self, e: SpoolError, generation: u64) -> Adopted {
        if e.is_failover() {
            self.shared.primary.invalidate(generation, &e).await;
        }
        Adopted::Interrupted(Some(e.to_string()))
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.lease_ttl_ms)
    }

    /// A failed pass may have left up to `window` publishes routed but
    /// unconfirmed, each republished (a duplicate) on the next pass: halve
    /// the window, so a broker that keeps failing passes costs fewer
    /// duplicates each time (down to one, strict order).
    fn shrink_window(&mut self) {
        let window = (self.window / 2).max(1);
        if window != self.window {
            debug!(stream = %self.shared.key, window, "Drain window halved after a failed pass.");
        }
        self.window = window;
        self.confirms_at_window = 0;
        self.shared.set_drain_window(window);
    }

    /// A confirm arrived: a full window of them in a row doubles the
    /// window, back up to the configured one.
    fn grow_window(&mut self) {
        self.confirms_at_window += 1;
        if self.window < self.cfg.window && self.confirms_at_window >= self.window {
            self.window = (self.window * 2).min(self.cfg.window);
            self.confirms_at_window = 0;
            self.shared.set_drain_window(self.window);
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
                self.shared.set_drainer_state(DrainerState::Disabled);
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
                    self.shared.set_drainer_state(DrainerState::Standby);
                    if sleep_unless_cancelled(&cancel, self.ttl() / 3).await {
                        continue;
                    }
                    break;
                }
                Err((e, g)) => Stop::Redis(e, g),
            };
            // `None` goes round again; a cancelled pass ends the loop by its
            // condition.
            let Some(pause) = self.pause_reason(stop).await else {
                continue;
            };
            self.shared.record_drain_pause(&pause);
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
        self.shared.set_drainer_state(DrainerState::NotRunning);
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
                warn!(stream = %self.shared.key, %error, window = self.window, "Republishing a spooled message failed; pausing the drainer.");
                Some(error)
            }
            Stop::Redis(e, generation) => {
                if e.is_failover() {
                    self.shared.primary.invalidate(generation, &e).await;
                }
                warn!(stream = %self.shared.key, error = %e, "Drainer cannot reach Redis; pausing.");
                Some(e.to_string())
            }
        }
    }

    /// After a failed pass: wait `wait`, showing why, or until the broker
    /// may take publishes again ([`DrainerHandle::kick`]): a pause waits
    /// out a broker that failed, never one that came back. False when
    /// `cancel` fired first.
    async fn pause(&self, cancel: &CancellationToken, error: String, wait: Duration) -> bool {
        self.shared.set_drainer_state(DrainerState::Paused {
            error,
            retry_in_ms: wait.as_millis() as u64,
        });
        metrics::counter!(super::metric::DRAIN_PAUSES).increment(1);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = self.shared.wake.notified() => {
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
            self.shared.set_drainer_state(DrainerState::Idle);
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
            Err((e, g)) => Err(Stop::Redis(e, g)),
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
        if let Err((e, g)) = self.delete_unsettled().await {
            return Stop::Redis(e, g);
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
                Ok(Err((e, g, entries))) => {
                    self.unsettled.extend(entries);
                    failure = Some((e, g));
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
            (_, Some((e, g))) => Stop::Redis(e, g),
        }
    }

    /// Delete the confirmed entries an earlier delete could not; on failure
    /// they stay in `unsettled`.
    async fn delete_unsettled(&mut self) -> Result<(), (SpoolError, u64)> {
        let entries = std::mem::take(&mut self.unsettled);
        delete_entries(self.shared.clone(), entries)
            .await
            .map_err(|(e, g, entries)| {
                self.unsettled = entries;
                (e, g)
            })
    }

    /// Move an undecodable entry aside (it is deleted in order like a
    /// confirmed one).
    async fn park_corrupt(&self, entry: &Entry, detail: &str) -> Result<(), (SpoolError, u64)> {
        error!(stream = %self.shared.key, id = %entry.stream_id, %detail, corrupt = %self.corrupt_key, "Spool entry cannot be decoded; moving it aside.");
        let link = self.shared.primary.get().await.map_err(|e| (e, 0))?;
        let mut conn = link.conn();
        let script = r"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 1 then
  local args = {KEYS[2], '*', 'from', ARGV[1], 'error', ARGV[2]}
  for _, v in ipairs(e[1][2]) do args[#args + 1] = v end
  redis.call('XADD', unpack(args))
end
return 1
";
        let _: Value = redis::cmd("EVAL")
            .arg(script)
            .arg(2)
            .arg(&self.shared.key)
            .arg(&self.corrupt_key)
            .arg(&entry.stream_id)
            .arg(detail)
            .query_async(&mut conn)
            .await
            .map_err(|e| (SpoolError::from_redis(&link.addr, e), link.generation))?;
        Ok(())
    }

    async fn extend_lease(&self) -> Result<bool, (SpoolError, u64)> {
        let link = self.shared.primary.get().await.map_err(|e| (e, 0))?;
        let mut conn = link.conn();
        let mut cmd = redis::cmd("EVAL");
        match &self.owner_key {
            None => cmd.arg(LEASE_SCRIPT).arg(1).arg(&self.lock_key),
            Some(owner) => cmd
                .arg(ADOPT_LEASE_SCRIPT)
                .arg(2)
                .arg(&self.lock_key)
                .arg(owner),
        };
        let held: i64 = cmd
            .arg(&self.token)
            .arg(self.cfg.lease_ttl_ms)
            .query_async(&mut conn)
            .await
            .map_err(|e| (SpoolError::from_redis(&link.addr, e), link.generation))?;
        Ok(held == 1)
    }

    async fn release_lease(&self) {
        let Some(link) = self.shared.primary.peek().await else {
            return;
        };
        let mut conn = link.conn();
        let released: Result<i64, _> = redis::cmd("EVAL")
            .arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(&self.lock_key)
            .arg(&self.token)
            .query_async(&mut conn)
            .await;
        if let Err(e) = released {
            debug!(stream = %self.shared.key, error = %e, "Could not release the drain lease; it expires by itself.");
        }
    }
}

/// A lease this drainer holds: when it runs out unless renewed, and the
/// timer that renews it every third of its TTL.
struct Lease {
    until: Instant,
    renew: tokio::time::Interval,
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

/// How an event ends a pass: why, and what becomes of the publishes still
/// in flight (see [`Drainer::finish`]).
type End = (Stop, Settle);

/// A Redis failure mid-pass: stop sending, collect the confirms in flight.
fn redis_end((e, g): (SpoolError, u64)) -> End {
    (Stop::Redis(e, g), Settle::Collect)
}

/// One drain pass (see [`Drainer::drain_pass`]) and its state. Each turn
/// of the loop starts a read if the queue runs low, fills the window,
/// starts a delete of the confirmed prefix, then waits for one event: one
/// method per `select!` arm. An event that ends the pass returns the
/// [`End`], and [`Drainer::finish`] settles it.
struct DrainPass<'a, P: DrainPublisher> {
    drainer: &'a mut Drainer<P>,
    cancel: &'a CancellationToken,
    lease: &'a mut Lease,
    /// Publishes awaiting their confirm, the confirmed prefix, the delete.
    pass: Pass<P::Error>,
    /// Entries read and not yet sent, in stream order.
    queue: VecDeque<(Entry, Result<OutboundMessage, String>)>,
    /// The `XRANGE` in flight, at most one.
    reading: Option<BoxFuture<'static, ReadResult>>,
    /// The last stream id read; the next read starts after it.
    last_read: Option<String>,
    /// A read returned less than a batch: the stream has no more for now.
    at_end: bool,
    /// Something was sent: the drainer shows as draining.
    sent_any: bool,
    stall: Duration,
    /// The last send or confirm; a stall is measured from it. Progress only
    /// stores the time: the timer is moved when it fires early, not re-armed
    /// on every confirm.
    progress_at: Instant,
    stall_timer: Pin<Box<tokio::time::Sleep>>,
}

impl<'a, P: DrainPublisher> DrainPass<'a, P> {
    fn new(
        drainer: &'a mut Drainer<P>,
        cancel: &'a CancellationToken,
        lease: &'a mut Lease,
    ) -> Self {
        let stall = Duration::from_millis(drainer.cfg.stall_timeout_ms);
        DrainPass {
            drainer,
            cancel,
            lease,
            pass: Pass {
                inflight: FuturesOrdered::new(),
                confirmed: Vec::new(),
                deleting: None,
            },
            queue: VecDeque::new(),
            reading: None,
            last_read: None,
            at_end: false,
            sent_any: false,
            stall,
            progress_at: Instant::now(),
            stall_timer: Box::pin(tokio::time::sleep(stall)),
        }
    }

    /// Turn until the stream is drained or an event ends the pass.
    async fn run(mut self) -> Stop {
        let (stop, settle) = loop {
            self.start_read();
            if let Err(end) = self.fill_window().await {
                break end;
            }
            self.start_delete();
            if self.is_done() {
                return if self.cancel.is_cancelled() {
                    Stop::Cancelled
                } else {
                    Stop::Idle
                };
            }
            if let Err(end) = self.next_event().await {
                break end;
            }
        };
        self.drainer.finish(stop, self.pass, settle).await
    }

    /// Nothing queued, read, sent or deleted is outstanding (and a read
    /// would have started if the stream had more).
    fn is_done(&self) -> bool {
        self.pass.inflight.is_empty()
            && self.queue.is_empty()
            && self.reading.is_none()
            && self.pass.deleting.is_none()
    }

    /// Read the next page when the queue is below a batch.
    fn start_read(&mut self) {
        let batch = self.drainer.cfg.batch;
        if self.reading.is_none() && !self.at_end && self.queue.len() < batch {
            self.reading = Some(Box::pin(read_entries(
                self.drainer.shared.clone(),
                self.last_read.clone(),
                batch,
            )));
        }
    }

    /// Delete the confirmed prefix, one delete at a time.
    fn start_delete(&mut self) {
        if self.pass.deleting.is_none() && !self.pass.confirmed.is_empty() {
            self.pass.deleting = Some(Box::pin(delete_entries(
                self.drainer.shared.clone(),
                std::mem::take(&mut self.pass.confirmed),
            )));
        }
    }

    /// Send queued entries until the window is full, in stream order,
    /// checking the lease before each.
    async fn fill_window(&mut self) -> Result<(), End> {
        while self.pass.inflight.len() < self.drainer.window && !self.cancel.is_cancelled() {
            let Some((entry, msg)) = self.queue.pop_front() else {
                break;
            };
            if !self.sent_any {
                self.drainer
                    .shared
                    .set_drainer_state(DrainerState::Draining);
                self.sent_any = true;
            }
            if Instant::now() + Duration::from_millis(50) >= self.lease.until {
                self.renew_lease().await?;
            }
            match msg {
                Ok(msg) => self.publish(entry, msg).await?,
                Err(detail) => {
                    self.drainer
                        .park_corrupt(&entry, &detail)
                        .await
                        .map_err(redis_end)?;
                    self.pass
                        .inflight
                        .push_back(Box::pin(async move { (entry, Ok(())) }));
                }
            }
        }
        Ok(())
    }

    /// Send one entry; its confirm joins the window.
    async fn publish(&mut self, entry: Entry, msg: OutboundMessage) -> Result<(), End> {
        // Ends at the confirm (the span lives in the confirm's future).
        let span = crate::telemetry::drain_publish_span(&msg);
        let confirm = self
            .drainer
            .send(msg, self.stall)
            .instrument(span.clone())
            .await
            .map_err(|error| (Stop::Publish(error), Settle::Collect))?;
        self.progress_at = Instant::now();
        self.drainer.shared.record_republished();
        self.pass.inflight.push_back(Box::pin(async move {
            let confirmed = confirm.await;
            drop(span);
            (entry, confirmed)
        }));
        Ok(())
    }

    async fn renew_lease(&mut self) -> Result<(), End> {
        self.drainer
            .renew_lease(self.lease)
            .await
            .map_err(|stop| (stop, Settle::Collect))
    }

    /// Wait for one event and handle it.
    async fn next_event(&mut self) -> Result<(), End> {
        // Cancel-safe: confirms left in flight are simply dropped; their
        // entries stay in the stream and are republished. A read or delete
        // in flight is finished or dropped in `finish`.
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err((Stop::Cancelled, Settle::Drop)),
            _ = self.lease.renew.tick() => self.renew_lease().await,
            r = poll_opt(&mut self.pass.deleting), if self.pass.deleting.is_some() => {
                self.deleted(r)
            }
            r = poll_opt(&mut self.reading), if self.reading.is_some() => self.read(r),
            done = self.pass.inflight.next(), if !self.pass.inflight.is_empty() => {
                self.confirmed(done)
            }
            // Last, so a confirm that is ready wins over the timer.
            _ = &mut self.stall_timer, if !self.pass.inflight.is_empty() => self.stall_timer_fired(),
        }
    }

    /// The delete finished; what it could not delete waits for the next
    /// pass.
    fn deleted(&mut self, r: DeleteResult) -> Result<(), End> {
        self.pass.deleting = None;
        r.map_err(|(e, g, entries)| {
            self.drainer.unsettled.extend(entries);
            redis_end((e, g))
        })
    }

    /// A page was read: queue it.
    fn read(&mut self, r: ReadResult) -> Result<(), End> {
        self.reading = None;
        let entries = r.map_err(redis_end)?;
        if entries.len() < self.drainer.cfg.batch {
            self.at_end = true;
        }
        if let Some((e, _)) = entries.last() {
            self.last_read = Some(e.stream_id.clone());
        }
        self.queue.extend(entries);
        Ok(())
    }

    /// The oldest publish in flight was confirmed, or failed.
    fn confirmed(&mut self, done: Option<(Entry, Result<(), P::Error>)>) -> Result<(), End> {
        let Some((entry, result)) = done else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                self.progress_at = Instant::now();
                self.drainer.grow_window();
                self.pass.confirmed.push(entry);
                Ok(())
            }
            Err(e) => {
                // This one and every publish behind it.
                let abandoned = self.pass.inflight.len() + 1;
                Err((Stop::Publish(e.to_string()), Settle::Abandon(abandoned)))
            }
        }
    }

    /// The stall timer fired: a stall if there was no progress for the
    /// stall timeout (time the broker blocks publishes counts as progress;
    /// see the module doc, "Slow is not failed"), else it is moved to the
    /// new due time.
    fn stall_timer_fired(&mut self) -> Result<(), End> {
        if self.drainer.publisher.is_blocked() {
            self.progress_at = Instant::now();
        }
        let stall = self.stall;
        let due = self.progress_at + stall;
        if Instant::now() < due {
            self.stall_timer.as_mut().reset(due.into());
            return Ok(());
        }
        let abandoned = self.pass.inflight.len();
        self.drainer.publisher.stalled();
        let stop = Stop::Publish(format!(
            "no confirm for {stall:?} with {abandoned} publishes in flight"
        ));
        Err((stop, Settle::Abandon(abandoned)))
    }
}
