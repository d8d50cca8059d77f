//! The state the spool's writer, its drainer and the handles share:
//! counters, the depth, the primary, and the status published from them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tracing::error;

use super::status::{Adoption, SpoolStatus};
use crate::buffer::drainer::DrainRecord;
use crate::buffer::sentinel::Primary;
use crate::buffer::{SpoolConfig, SpoolError, metric};

/// State shared by the writer, the drainer and the handles.
pub(crate) struct Shared {
    pub(crate) cfg: SpoolConfig,
    /// `cfg.host_id()`, resolved once: what this host's claim holds.
    pub(super) host_id: String,
    pub(crate) key: String,
    pub(crate) bytes_key: String,
    pub(crate) primary: Arc<Primary>,
    pub(super) depth: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Stream-id milliseconds of the oldest entry; 0 = none known.
    pub(super) oldest_ms: AtomicU64,
    /// Depth has been read from Redis at least once.
    pub(super) synced: AtomicBool,
    /// Mutations (appends/deletes) started and not finished, and finished;
    /// a depth read from Redis is trusted only if neither moved meanwhile.
    pub(super) mutating: AtomicU64,
    pub(super) mutations: AtomicU64,
    pub(super) appended: AtomicU64,
    pub(super) drained: AtomicU64,
    /// When the drainer last deleted entries (start-up until then).
    pub(super) last_drained_at: Mutex<Instant>,
    pub(super) refused: AtomicU64,
    /// Woken after each acknowledged batch (wakes an idle drainer).
    pub(crate) appended_notify: Notify,
    /// Kinds of unexpected reply already logged.
    pub(super) unexpected_logged: std::sync::Mutex<Vec<std::mem::Discriminant<SpoolError>>>,
    /// The drainer's state, written by the drainer, shown in status.
    pub(crate) drain: DrainRecord,
    pub(super) adoption: std::sync::Mutex<Adoption>,
    pub(super) status_tx: watch::Sender<SpoolStatus>,
}

impl Shared {
    pub(super) fn new(cfg: SpoolConfig, primary: Arc<Primary>, key: String) -> Shared {
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
            appended_notify: Notify::new(),
            unexpected_logged: std::sync::Mutex::new(Vec::new()),
            drain: DrainRecord::default(),
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

    /// The status now. Never waits: the primary is read from its watch,
    /// so a resolution under way (a frozen node, a failover) does not hold
    /// `/status` up.
    pub(super) fn snapshot(&self) -> SpoolStatus {
        let link = self.primary.peek();
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
            drainer: self.drain.state(),
            drain: self.drain.stats(),
            drain_idle_ms: self.drain_idle().map(|d| d.as_millis() as u64),
            adoption: self.adoption.lock().map(|g| g.clone()).unwrap_or_default(),
        }
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

pub(super) fn sub(a: &AtomicU64, n: u64) {
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
