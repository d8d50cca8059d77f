//! The spool: a Redis Stream of [`OutboundMessage`]s, one entry each,
//! written by one group-committing writer task.
//!
//! Owns: the writer task (batches queued appends into one pipeline — a Lua
//! script that checks the size limit and `XADD`s every entry — followed by
//! one `WAIT`), the status refresher (depth, bytes, oldest age, the
//! primary's role), and the `+switch-master` listener. It does not publish
//! anything: the [`crate::buffer::Drainer`] does.
//!
//! # Entry format
//! Fields `id` (a UUIDv7, also the message's AMQP `message_id` when it had
//! none) and `m` (the message as JSON: every property, header and the body,
//! given back unchanged). The stream id's millisecond part is the append
//! time on the primary, which gives the oldest entry's age.
//!
//! # Durability
//! An append is acknowledged only after `WAIT` confirmed it on the required
//! replicas (see [`super::sentinel`] for which count). A write that fails or
//! is not confirmed is retried on the re-resolved primary until the
//! append's deadline (`append_timeout_ms`), then refused with a typed
//! [`SpoolError`]. A refused write may still exist in the stream (it was
//! written but not confirmed), in which case it is drained like any other:
//! at least once, never "acknowledged and lost".
//!
//! # Size limit
//! Entries (`XLEN`) and payload bytes (a counter key next to the stream,
//! kept in the same scripts that add and delete entries) are checked inside
//! the append script; past the limit, appends are refused with
//! [`SpoolError::SpoolFull`], nothing is trimmed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::sentinel::Primary;
use super::{SpoolConfig, SpoolError, metric};
use crate::backoff::{Backoff, BackoffConfig};
use crate::message::{HeaderValue, OutboundMessage};

/// Adds a batch: checks the limits, `XADD`s each entry (refusing the rest
/// once a limit is hit), adds the bytes to the counter. Replies one stream
/// id or nil (refused) per entry.
const APPEND_SCRIPT: &str = r"
local len = redis.call('XLEN', KEYS[1])
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
local max_n = tonumber(ARGV[1])
local max_b = tonumber(ARGV[2])
local out = {}
local added = 0
local full = false
for i = 3, #ARGV, 2 do
  local size = string.len(ARGV[i + 1])
  if full or len + 1 > max_n or bytes + size > max_b then
    full = true
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'm', ARGV[i + 1])
    len = len + 1
    bytes = bytes + size
    added = added + size
  end
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
return out
";

/// Where an appended message sits in the spool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryId {
    /// The Redis stream id (`<ms>-<seq>`).
    pub stream_id: String,
    /// The entry's unique id; also the AMQP `message_id` unless the message
    /// carried its own.
    pub id: Uuid,
}

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

/// State shared by the writer, the drainer and the handles.
pub(crate) struct Shared {
    pub(crate) cfg: SpoolConfig,
    /// `cfg.host_id()`, resolved once: what this host's claim holds.
    host_id: String,
    pub(crate) key: String,
    pub(crate) bytes_key: String,
    pub(crate) primary: Arc<Primary>,
    depth: AtomicU64,
    bytes: AtomicU64,
    /// Stream-id milliseconds of the oldest entry; 0 = none known.
    oldest_ms: AtomicU64,
    /// Depth has been read from Redis at least once.
    synced: AtomicBool,
    /// Mutations (appends/deletes) started and not finished, and finished;
    /// a depth read from Redis is trusted only if neither moved meanwhile.
    mutating: AtomicU64,
    mutations: AtomicU64,
    appended: AtomicU64,
    drained: AtomicU64,
    /// When the drainer last deleted entries (start-up until then).
    last_drained_at: Mutex<Instant>,
    refused: AtomicU64,
    republished: AtomicU64,
    drain_pauses: AtomicU64,
    drain_window: AtomicU64,
    last_drain_failure: std::sync::Mutex<Option<String>>,
    /// Woken after each acknowledged batch (wakes an idle drainer).
    pub(crate) appended_notify: Notify,
    /// Woken when the broker may take publishes again (a new session, an
    /// unblocked connection): ends a drainer's backoff pause at once.
    pub(crate) wake: Notify,
    /// Kinds of unexpected reply already logged.
    unexpected_logged: std::sync::Mutex<Vec<std::mem::Discriminant<SpoolError>>>,
    drainer: std::sync::Mutex<DrainerState>,
    adoption: std::sync::Mutex<Adoption>,
    status_tx: watch::Sender<SpoolStatus>,
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

impl Shared {
    fn new(cfg: SpoolConfig, primary: Arc<Primary>, key: String) -> Shared {
        let (status_tx, _) = watch::channel(SpoolStatus::default());
        Shared {
            bytes_key: format!("{key}:bytes"),
            key,
            host_id: cfg.host_id(),
            cfg,
            primary,
            depth: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            oldest_ms: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            mutating: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            last_drained_at: Mutex::new(Instant::now()),
            refused: AtomicU64::new(0),
            republished: AtomicU64::new(0),
            drain_pauses: AtomicU64::new(0),
            drain_window: AtomicU64::new(0),
            last_drain_failure: std::sync::Mutex::new(None),
            appended_notify: Notify::new(),
            wake: Notify::new(),
            unexpected_logged: std::sync::Mutex::new(Vec::new()),
            drainer: std::sync::Mutex::new(DrainerState::NotRunning),
            adoption: std::sync::Mutex::new(Adoption::default()),
            status_tx,
        }
    }

    /// The state of another host's stream `key`, on the same primary, for
    /// draining it (its counters are its own; this spool's stay as they are).
    pub(crate) fn adopted(&self, key: String) -> Arc<Shared> {
        Arc::new(Shared::new(self.cfg.clone(), self.primary.clone(), key))
    }

    /// Record what adoption is doing, for status.
    pub(crate) fn set_adoption(&self, f: impl FnOnce(&mut Adoption)) {
        if let Ok(mut g) = self.adoption.lock() {
            f(&mut g);
        }
    }

    /// Mark an append or delete under way until the guard drops (also when
    /// the task doing it is cancelled or aborted mid-way).
    pub(crate) fn begin_mutation(&self) -> MutationGuard<'_> {
        self.mutating.fetch_add(1, Ordering::SeqCst);
        MutationGuard(self)
    }

    /// A reply Warren did not expect (see
    /// [`SpoolError::UnexpectedReply`]): logged once per kind of error
    /// per process, the connection kept.
    pub(crate) fn unexpected_reply(&self, e: &SpoolError) {
        let mut seen = crate::sync::lock(&self.unexpected_logged);
        let key = std::mem::discriminant(e);
        if !seen.contains(&key) {
            seen.push(key);
            error!(stream = %self.key, error = %e, "Unexpected reply from Redis (a bug, or data Warren did not write); keeping the connection. Logged once.");
        }
        metrics::counter!(metric::UNEXPECTED_REPLIES).increment(1);
    }

    /// Record `n` entries of `bytes` drained (deleted after their confirm).
    pub(crate) fn record_drained(&self, confirmed: u64, deleted: u64, bytes: u64) {
        sub(&self.depth, deleted);
        sub(&self.bytes, bytes);
        self.drained.fetch_add(confirmed, Ordering::Relaxed);
        if confirmed > 0
            && let Ok(mut at) = self.last_drained_at.lock()
        {
            *at = Instant::now();
        }
        metrics::counter!(metric::DRAINED).increment(confirmed);
    }

    /// One more entry handed to the broker by the drainer.
    pub(crate) fn record_republished(&self) {
        self.republished.fetch_add(1, Ordering::Relaxed);
    }

    /// A drain pass failed with `error`; the drainer pauses.
    pub(crate) fn record_drain_pause(&self, error: &str) {
        self.drain_pauses.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.last_drain_failure.lock() {
            *g = Some(error.to_owned());
        }
    }

    /// The drainer's current window.
    pub(crate) fn set_drain_window(&self, window: usize) {
        self.drain_window.store(window as u64, Ordering::Relaxed);
    }

    /// Entries confirmed and deleted by the drainer since start.
    pub(crate) fn drained_total(&self) -> u64 {
        self.drained.load(Ordering::Relaxed)
    }

    /// Store a depth read from Redis if no mutation raced with the read.
    /// `before` is `mutation_mark()` taken before the read.
    pub(crate) fn sync_depth(&self, before: Option<u64>, depth: u64, bytes: u64) {
        if let Some(m0) = before
            && self.mutating.load(Ordering::SeqCst) == 0
            && self.mutations.load(Ordering::SeqCst) == m0
        {
            self.depth.store(depth, Ordering::SeqCst);
            self.bytes.store(bytes, Ordering::SeqCst);
            if depth == 0 {
                self.oldest_ms.store(0, Ordering::Relaxed);
            }
            self.synced.store(true, Ordering::SeqCst);
        }
    }

    /// `Some(mark)` when no mutation is under way.
    pub(crate) fn mutation_mark(&self) -> Option<u64> {
        let m = self.mutations.load(Ordering::SeqCst);
        (self.mutating.load(Ordering::SeqCst) == 0).then_some(m)
    }

    pub(crate) fn set_drainer_state(&self, state: DrainerState) {
        if let Ok(mut g) = self.drainer.lock()
            && *g != state
        {
            *g = state;
        }
    }

    /// With entries waiting, how long nothing has drained: since the last
    /// drained entry or, if later, the oldest entry's append.
    pub(crate) fn drain_idle(&self) -> Option<Duration> {
        if self.depth.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let since_drained = self
            .last_drained_at
            .lock()
            .map(|at| at.elapsed())
            .unwrap_or_default();
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let oldest_age =
            (oldest > 0).then(|| Duration::from_millis(now_ms().saturating_sub(oldest)));
        Some(oldest_age.map_or(since_drained, |age| age.min(since_drained)))
    }

    fn drainer_state(&self) -> DrainerState {
        self.drainer.lock().map(|g| g.clone()).unwrap_or_default()
    }

    async fn snapshot(&self) -> SpoolStatus {
        let link = self.primary.peek().await;
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let depth = self.depth.load(Ordering::SeqCst);
        SpoolStatus {
            highly_available: self.cfg.is_sentinel(),
            mode: if self.cfg.is_sentinel() {
                "sentinel".into()
            } else {
                "not highly available (single Redis URL)".into()
            },
            stream_key: self.key.clone(),
            primary: link.as_ref().map(|l| l.addr.clone()),
            primary_generation: self.primary.generation(),
            wait_for_replicas: link.as_ref().map(|l| l.wait_for()).unwrap_or(0),
            last_error: self.primary.last_error(),
            config_warnings: link
                .as_ref()
                .map(|l| l.warnings.clone())
                .unwrap_or_default(),
            depth,
            bytes: self.bytes.load(Ordering::SeqCst),
            oldest_age_ms: (oldest > 0 && depth > 0).then(|| now_ms().saturating_sub(oldest)),
            appended: self.appended.load(Ordering::Relaxed),
            drained: self.drained.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            drainer: self.drainer_state(),
            drain: DrainStats {
                republished: self.republished.load(Ordering::Relaxed),
                pauses: self.drain_pauses.load(Ordering::Relaxed),
                window: self.drain_window.load(Ordering::Relaxed),
                last_failure: self.last_drain_failure.lock().ok().and_then(|g| g.clone()),
            },
            drain_idle_ms: self.drain_idle().map(|d| d.as_millis() as u64),
            adoption: self.adoption.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }

    /// The last drain failure, if any.
    pub(crate) fn last_drain_failure(&self) -> Option<String> {
        self.last_drain_failure.lock().ok().and_then(|g| g.clone())
    }
}

/// See [`Shared::begin_mutation`].
pub(crate) struct MutationGuard<'a>(&'a Shared);

impl Drop for MutationGuard<'_> {
    fn drop(&mut self) {
        self.0.mutations.fetch_add(1, Ordering::SeqCst);
        self.0.mutating.fetch_sub(1, Ordering::SeqCst);
    }
}

fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        Some(v.saturating_sub(n))
    });
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds part of a stream id.
pub(crate) fn stream_id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

struct AppendRequest {
    id: Uuid,
    payload: Vec<u8>,
    deadline: Instant,
    reply: oneshot::Sender<Result<EntryId, SpoolError>>,
}

/// Owner of the spool's tasks. Build with [`Spool::new`], then
/// `spool.run(cancel)`; talk to it through the [`SpoolHandle`].
pub struct Spool {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<AppendRequest>,
}

/// A cheap, clonable handle on a running [`Spool`].
#[derive(Clone)]
pub struct SpoolHandle {
    pub(crate) shared: Arc<Shared>,
    tx: mpsc::Sender<AppendRequest>,
}

impl SpoolHandle {
    /// The settings the spool runs with.
    pub fn config(&self) -> &SpoolConfig {
        &self.shared.cfg
    }
}

impl Spool {
    /// Validate `cfg` and build the spool and its handle. No I/O yet: the
    /// primary is resolved when [`Spool::run`] starts.
    pub fn new(cfg: SpoolConfig) -> Result<(Spool, SpoolHandle), SpoolError> {
        cfg.validate()?;
        let primary = Arc::new(Primary::new(&cfg)?);
        let key = cfg.stream_key();
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let shared = Arc::new(Shared::new(cfg, primary, key));
        let handle = SpoolHandle {
            shared: shared.clone(),
            tx,
        };
        Ok((Spool { shared, rx }, handle))
    }

    /// Run the writer, the status refresher and (with Sentinel) the
    /// `+switch-master` listener until `cancel`. On cancel the writer stops
    /// taking appends and finishes the ones already queued (each bounded by
    /// its deadline) before returning.
    pub async fn run(self, cancel: CancellationToken) {
        let Spool { shared, rx } = self;
        info!(stream = %shared.key, mode = if shared.cfg.is_sentinel() { "sentinel" } else { "plain" }, "Spool starting.");
        if !shared.cfg.is_sentinel() {
            warn!(stream = %shared.key, "Spool uses a single Redis URL: not highly available.");
        }
        let tasks = TaskTracker::new();
        tasks.spawn(shared.primary.clone().watch_switch_master(cancel.clone()));
        tasks.spawn(refresh_loop(shared.clone(), cancel.clone()));
        Writer {
            shared: shared.clone(),
        }
        .run(rx, cancel.clone())
        .await;
        tasks.close();
        tasks.wait().await;
        info!(stream = %shared.key, "Spool stopped.");
    }
}

impl SpoolHandle {
    /// Append `message` to the spool. Returns once the entry is durable
    /// (written on the primary and confirmed by the required replicas), or
    /// an error: then it was **not** accepted and the caller must refuse or
    /// retry it. If the message has no `message_id`, the entry id becomes
    /// its `message_id`.
    pub async fn append(&self, mut message: OutboundMessage) -> Result<EntryId, SpoolError> {
        let started = std::time::Instant::now();
        let result = self.append_inner(&mut message).await;
        if result.is_ok() {
            metrics::histogram!(metric::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
        } else {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::REFUSED).increment(1);
        }
        result
    }

    async fn append_inner(&self, message: &mut OutboundMessage) -> Result<EntryId, SpoolError> {
        check_encodable(message)?;
        let id = Uuid::now_v7();
        if message.properties.message_id.is_none() {
            message.properties.message_id = Some(id.to_string());
        }
        let payload =
            serde_json::to_vec(&message).map_err(|e| SpoolError::Unencodable(e.to_string()))?;
        let timeout = self.shared.cfg.append_timeout();
        let deadline = Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let req = AppendRequest {
            id,
            payload,
            deadline,
            reply,
        };
        match tokio::time::timeout_at(deadline.into(), self.tx.send(req)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(SpoolError::Closed),
            Err(_) => {
                return Err(SpoolError::Timeout {
                    after: timeout,
                    last: Box::new(SpoolError::NoPrimary {
                        master: self.shared.primary.master_name().unwrap_or("").into(),
                        detail: "the spool writer's queue stayed full".into(),
                    }),
                });
            }
        }
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// True when the spool is known to hold no entries. Cheap (atomics).
    /// False until the depth has been read from Redis once, so leftovers
    /// from before a restart keep order. The outbox routes publishes to the
    /// spool while this is false.
    pub fn is_empty(&self) -> bool {
        self.shared.synced.load(Ordering::SeqCst) && self.shared.depth.load(Ordering::SeqCst) == 0
    }

    /// Entries in the spool (cheap; refreshed from Redis periodically).
    pub fn depth(&self) -> u64 {
        self.shared.depth.load(Ordering::SeqCst)
    }

    /// With entries waiting: how long nothing has drained (see
    /// [`SpoolStatus::drain_idle_ms`]).
    pub fn drain_idle(&self) -> Option<Duration> {
        self.shared.drain_idle()
    }

    /// Why the drainer's last failed pass failed.
    pub fn last_drain_failure(&self) -> Option<String> {
        self.shared.last_drain_failure()
    }

    /// True with Sentinel; false with a single Redis URL.
    pub fn is_highly_available(&self) -> bool {
        self.shared.cfg.is_sentinel()
    }

    /// A fresh status snapshot.
    pub async fn status(&self) -> SpoolStatus {
        self.shared.snapshot().await
    }

    /// Status updates, published every `status_interval_ms`.
    pub fn subscribe(&self) -> watch::Receiver<SpoolStatus> {
        self.shared.status_tx.subscribe()
    }

    /// The stream key this spool writes to.
    pub fn stream_key(&self) -> &str {
        &self.shared.key
    }
}

/// Refuse what JSON cannot carry faithfully: non-finite floats.
fn check_encodable(m: &OutboundMessage) -> Result<(), SpoolError> {
    fn ok(v: &HeaderValue) -> bool {
        match v {
            HeaderValue::F32(f) => f.is_finite(),
            HeaderValue::F64(f) => f.is_finite(),
            HeaderValue::Array(a) => a.iter().all(ok),
            HeaderValue::Table(t) => t.iter().all(|(_, v)| ok(v)),
            _ => true,
        }
    }
    match m.properties.headers.iter().find(|(_, v)| !ok(v)) {
        Some((k, _)) => Err(SpoolError::Unencodable(format!(
            "header {k} holds a non-finite float"
        ))),
        None => Ok(()),
    }
}

struct Writer {
    shared: Arc<Shared>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<AppendRequest>, cancel: CancellationToken) {
        let max_batch = self.shared.cfg.max_batch;
        loop {
            // Cancel-safe: `recv` loses nothing when another branch wins.
            let first = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
            };
            let mut batch = vec![first];
            let mut bytes = 0usize;
            while batch.len() < max_batch && bytes < 8 << 20 {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.payload.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
        }
        // Flush what was queued before shutdown.
        rx.close();
        let mut rest = Vec::new();
        while let Ok(r) = rx.try_recv() {
            rest.push(r);
        }
        while !rest.is_empty() {
            let n = rest.len().min(max_batch);
            let chunk: Vec<_> = rest.drain(..n).collect();
            self.commit(chunk).await;
        }
    }

    /// Commit a batch: retry on the re-resolved primary until each
    /// request's deadline, then refuse.
    async fn commit(&self, batch: Vec<AppendRequest>) {
        let mut batch = batch;
        let mut last: Option<SpoolError> = None;
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(250),
        });
        loop {
            let now = Instant::now();
            let (expired, live): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|r| r.deadline <= now);
            for r in expired {
                let last = last.clone().unwrap_or_else(|| SpoolError::NoPrimary {
                    master: self.shared.primary.master_name().unwrap_or("").into(),
                    detail: "deadline passed in the writer queue".into(),
                });
                let _ = r.reply.send(Err(SpoolError::Timeout {
                    after: self.shared.cfg.append_timeout(),
                    last: Box::new(last),
                }));
            }
            batch = live;
            if batch.is_empty() {
                return;
            }
            match self.try_commit(&batch).await {
                Ok(results) => {
                    for (r, res) in batch.into_iter().zip(results) {
                        let _ = r.reply.send(res);
                    }
                    return;
                }
                Err((e, generation)) => {
                    if e.is_failover()
                        && let Some(g) = generation
                    {
                        self.shared.primary.invalidate(g, &e).await;
                    }
                    if !e.is_transient() {
                        for r in batch {
                            let _ = r.reply.send(Err(e.clone()));
                        }
                        return;
                    }
                    debug!(error = %e, entries = batch.len(), "Spool write not durable; retrying.");
                    last = Some(e);
                    let earliest = batch
                        .iter()
                        .map(|r| r.deadline)
                        .min()
                        .unwrap_or_else(Instant::now);
                    let wake = (Instant::now() + backoff.next_fixed()).min(earliest);
                    tokio::time::sleep_until(wake.into()).await;
                }
            }
        }
    }

    /// One attempt: the append script then `WAIT`, in one pipeline.
    async fn try_commit(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<EntryId, SpoolError>>, (SpoolError, Option<u64>)> {
        let shared = &self.shared;
        let link = shared.primary.get().await.map_err(|e| (e, None))?;
        let generation = Some(link.generation);
        let wait_for = link.wait_for();
        let pipe = append_pipeline(shared, batch, wait_for);
        let mut conn = link.conn();
        // Held until depth and bytes include this batch, so a concurrent
        // depth read from Redis is not stored over them.
        let mutation = shared.begin_mutation();
        let reply: Result<Vec<Value>, _> = pipe.query_async(&mut conn).await;
        let ids = appended_ids(&link.addr, wait_for, reply).map_err(|e| (e, generation))?;
        let (results, added) = self.count_appended(batch, ids);
        drop(mutation);
        shared.appended.fetch_add(added, Ordering::Relaxed);
        metrics::counter!(metric::APPENDED).increment(added);
        if added > 0 {
            shared.appended_notify.notify_one();
        }
        Ok(results)
    }

    /// Each request's result from the script's reply (`ids`: a stream id,
    /// or nil where a limit refused it); adds what was appended to the
    /// depth and bytes. Returns the results and how many were appended.
    fn count_appended(
        &self,
        batch: &[AppendRequest],
        ids: Vec<Value>,
    ) -> (Vec<Result<EntryId, SpoolError>>, u64) {
        let shared = &self.shared;
        let mut results = Vec::with_capacity(batch.len());
        let (mut added, mut added_bytes) = (0u64, 0u64);
        for (r, v) in batch.iter().zip(ids) {
            match v {
                Value::BulkString(b) => {
                    let stream_id = String::from_utf8_lossy(&b).into_owned();
                    // The first entry of an empty spool is its oldest.
                    if added == 0
                        && shared.depth.load(Ordering::SeqCst) == 0
                        && let Some(ms) = stream_id_ms(&stream_id)
                    {
                        let _ = shared.oldest_ms.compare_exchange(
                            0,
                            ms,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    added += 1;
                    added_bytes += r.payload.len() as u64;
                    results.push(Ok(EntryId {
                        stream_id,
                        id: r.id,
                    }));
                }
                _ => results.push(Err(SpoolError::SpoolFull {
                    key: shared.key.clone(),
                    max_entries: shared.cfg.max_entries,
                    max_bytes: shared.cfg.max_bytes,
                })),
            }
        }
        shared.depth.fetch_add(added, Ordering::SeqCst);
        shared.bytes.fetch_add(added_bytes, Ordering::SeqCst);
        (results, added)
    }
}

/// The append script over `batch`, then `WAIT` for `wait_for` replicas
/// (none when 0). Errors stay in the reply, to be read per command.
fn append_pipeline(shared: &Shared, batch: &[AppendRequest], wait_for: u32) -> redis::Pipeline {
    let mut p = redis::pipe();
    p.ignore_errors();
    p.cmd("EVAL")
        .arg(APPEND_SCRIPT)
        .arg(2)
        .arg(&shared.key)
        .arg(&shared.bytes_key)
        .arg(shared.cfg.max_entries)
        .arg(shared.cfg.max_bytes);
    for r in batch {
        p.arg(r.id.to_string()).arg(&r.payload);
    }
    if wait_for > 0 {
        p.cmd("WAIT").arg(wait_for).arg(shared.cfg.wait_timeout_ms);
    }
    p
}

/// The append script's per-entry replies, once `WAIT` (if any) confirmed
/// `wait_for` replicas; else why the batch is not durable.
fn appended_ids(
    addr: &str,
    wait_for: u32,
    reply: redis::RedisResult<Vec<Value>>,
) -> Result<Vec<Value>, SpoolError> {
    let mut values = reply
        .map_err(|e| SpoolError::from_redis(addr, e))?
        .into_iter();
    let ids = match values.next() {
        Some(Value::Array(ids)) => ids,
        Some(Value::ServerError(e)) => return Err(SpoolError::from_server(addr, e)),
        other => {
            return Err(SpoolError::Command {
                addr: addr.to_owned(),
                source: redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "unexpected append reply",
                    format!("{other:?}"),
                )),
            });
        }
    };
    if wait_for > 0 {
        replicated(addr, wait_for, values.next())?;
    }
    Ok(ids)
}

/// `WAIT`'s reply `reply` confirmed `wait_for` replicas; else why the
/// writes before it are not durable.
pub(crate) fn replicated(
    addr: &str,
    wait_for: u32,
    reply: Option<Value>,
) -> Result<(), SpoolError> {
    let acked = match reply {
        Some(Value::Int(n)) => n.max(0) as u64,
        Some(Value::ServerError(e)) => return Err(SpoolError::from_server(addr, e)),
        _ => 0,
    };
    if acked < u64::from(wait_for) {
        return Err(SpoolError::NotReplicated {
            addr: addr.to_owned(),
            acked,
            required: wait_for,
        });
    }
    Ok(())
}

/// Keep the connection checked, the depth honest and the status published.
async fn refresh_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut ticker = crate::sync::Ticker::new(shared.cfg.status_interval());
    while ticker.tick(&cancel).await {
        shared.primary.refresh().await;
        // Resolving here also runs the start-up checks before the first
        // append, so status shows them early.
        if let Ok(link) = shared.primary.get().await {
            renew_claim(&shared, &link).await;
            refresh_depth(&shared, &link).await;
        }
        let status = shared.snapshot().await;
        metrics::gauge!(metric::DEPTH).set(status.depth as f64);
        metrics::gauge!(metric::BYTES).set(status.bytes as f64);
        metrics::gauge!(metric::OLDEST_AGE).set(status.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!(metric::CONNECTED).set(if status.primary.is_some() { 1.0 } else { 0.0 });
        shared.status_tx.send_replace(status);
    }
}

/// This host's claim on its stream (`{stream}:owner`), renewed every status
/// interval: while it exists no other host adopts the stream. A failure is
/// only logged; the claim lapses after `owner_lease_ms` and the next
/// renewal, once Redis answers, takes it back (an adopter then stops).
async fn renew_claim(shared: &Shared, link: &super::sentinel::Link) {
    let mut conn = link.conn();
    let renewed: Result<(), _> = redis::cmd("SET")
        .arg(SpoolConfig::owner_key(&shared.key))
        .arg(&shared.host_id)
        .arg("PX")
        .arg(shared.cfg.owner_lease_ms)
        .query_async(&mut conn)
        .await;
    if let Err(e) = renewed {
        debug!(stream = %shared.key, error = %e, "Could not renew this host's claim on its stream.");
    }
}

/// Read depth, bytes and the oldest entry from the primary.
pub(crate) async fn refresh_depth(shared: &Shared, link: &super::sentinel::Link) {
    let mark = shared.mutation_mark();
    let mut p = redis::pipe();
    p.cmd("XLEN")
        .arg(&shared.key)
        .cmd("GET")
        .arg(&shared.bytes_key)
        .cmd("XRANGE")
        .arg(&shared.key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1);
    let mut conn = link.conn();
    // The counter read as signed: one below zero (a hand-edited stream)
    // counts as empty rather than failing every refresh.
    type DepthReply = (u64, Option<i64>, Vec<(String, Value)>);
    let reply: Result<DepthReply, _> = p.query_async(&mut conn).await;
    match reply {
        Ok((len, bytes, first)) => {
            if let Some(ms) = first.first().and_then(|(id, _)| stream_id_ms(id)) {
                shared.oldest_ms.store(ms, Ordering::Relaxed);
            }
            let bytes = bytes.unwrap_or(0).max(0).unsigned_abs();
            shared.sync_depth(mark, len, bytes);
        }
        Err(e) => {
            let e = SpoolError::from_redis(&link.addr, e);
            if e.is_failover() {
                shared.primary.invalidate(link.generation, &e).await;
            } else {
                shared.unexpected_reply(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_floats_are_refused() {
        let mut m = OutboundMessage::new("", "q", "x");
        assert!(check_encodable(&m).is_ok());
        m.properties.set_header(
            "t",
            HeaderValue::Table(vec![("f".into(), HeaderValue::F64(f64::NAN))]),
        );
        assert!(matches!(
            check_encodable(&m),
            Err(SpoolError::Unencodable(_))
        ));
    }

    #[test]
    fn stream_id_millis() {
        assert_eq!(stream_id_ms("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(stream_id_ms("x"), None);
    }
}
