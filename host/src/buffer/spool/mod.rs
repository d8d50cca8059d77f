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

mod shared;
mod status;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::sentinel::Primary;
use super::{SpoolConfig, SpoolError, metric};
use crate::message::{HeaderValue, OutboundMessage};
pub(crate) use shared::Shared;
use shared::stream_id_ms;
pub use status::{Adoption, SpoolStatus};
pub(crate) use writer::replicated;
use writer::{AppendRequest, Writer};

/// Where an appended message sits in the spool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryId {
    /// The Redis stream id (`<ms>-<seq>`).
    pub stream_id: String,
    /// The entry's unique id; also the AMQP `message_id` unless the message
    /// carried its own.
    pub id: Uuid,
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
        self.shared.drain.last_failure()
    }

    /// True with Sentinel; false with a single Redis URL.
    pub fn is_highly_available(&self) -> bool {
        self.shared.cfg.is_sentinel()
    }

    /// A fresh status snapshot.
    pub async fn status(&self) -> SpoolStatus {
        self.shared.snapshot()
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
        let status = shared.snapshot();
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

    /// A primary that takes the connection and never answers keeps a
    /// resolution under way, holding the lock concurrent resolutions wait
    /// on, until the connect timeout. The status reads the primary from its
    /// watch, so it answers without waiting for that resolution.
    #[tokio::test]
    async fn status_does_not_wait_for_a_resolution_under_way() {
        use futures::FutureExt as _;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let mut cfg = SpoolConfig::plain(format!("redis://{addr}"), "status-test");
        cfg.connect_timeout_ms = 120_000;
        let (_spool, handle) = Spool::new(cfg).unwrap();
        let primary = handle.shared.primary.clone();
        let resolving = tokio::spawn(async move { primary.get().await.map(|_| ()) });
        let (_held, _) = tokio::time::timeout(Duration::from_secs(30), silent.accept())
            .await
            .expect("the resolution never dialled the primary")
            .unwrap();
        let status = handle
            .status()
            .now_or_never()
            .expect("the status waited for the resolution under way");
        assert_eq!(status.primary, None);
        resolving.abort();
    }
}
