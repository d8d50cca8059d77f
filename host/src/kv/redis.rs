//! Plugins' state on Redis: reads on the current primary (a deduplicated
//! route's lookups batched into one `MGET`), and the queue to the
//! group-committing [`Writer`].
//!
//! The primary is found and followed by the spool's discovery
//! ([`crate::buffer::Primary`]): the same Sentinel rules, credentials, TLS
//! and `WAIT` count (every replica online when the primary was resolved).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::KvConfig;
use super::txn::{KvError, Op, Writes};
use super::writer::{Commit, Item, Request, Writer, Written, next_batch};
use crate::backoff::{Backoff, BackoffConfig};
use crate::buffer::{Primary, SpoolConfig, SpoolError};

/// How long a commit marker outlives its commit if the writer never
/// deletes it (it does, with the next batch, once the commit is
/// confirmed): longer than any delivery keeps retrying one commit.
const MARKER_TTL_SECS: u64 = 3600;

/// Reads, and the queues to the writer and the lookup batcher.
pub(super) struct RedisKv {
    primary: Arc<Primary>,
    tx: mpsc::Sender<Request>,
    lookups: mpsc::Sender<Lookup>,
    commit_timeout: Duration,
    read_timeout: Duration,
}

/// Where a commit's marker goes and how long it stays.
pub(super) struct Marker {
    pub(super) key: String,
    pub(super) ttl_secs: u64,
    /// Kept until it expires (a done mark), not deleted once confirmed.
    pub(super) keep: bool,
}

impl Marker {
    /// The marker of a commit outside deduplication, named by its id.
    pub(super) fn of(writes: &Writes) -> Marker {
        Marker {
            key: format!("warren:kv-commit:{}", writes.id()),
            ttl_secs: MARKER_TTL_SECS,
            keep: false,
        }
    }
}

/// The background work of a Redis store.
pub(super) struct Tasks {
    writer: Writer,
    reader: Reader,
    refresh: Duration,
}

impl Tasks {
    pub(super) async fn run(self, cancel: CancellationToken) {
        let tasks = TaskTracker::new();
        let primary = self.writer.primary.clone();
        tasks.spawn(primary.clone().watch_switch_master(cancel.clone()));
        tasks.spawn(refresh_loop(primary, self.refresh, cancel.clone()));
        tasks.spawn(self.reader.run(cancel.clone()));
        self.writer.run(cancel, tasks).await;
    }
}

impl RedisKv {
    pub(super) fn new(cfg: &KvConfig, redis: &SpoolConfig) -> Result<(RedisKv, Tasks), SpoolError> {
        redis.validate()?;
        let primary = Arc::new(Primary::new(redis)?);
        let depth = cfg.max_batch.saturating_mul(16).max(1);
        let (tx, rx) = mpsc::channel(depth);
        let (lookups, lookup_rx) = mpsc::channel(depth);
        let read_timeout = Duration::from_millis(cfg.read_timeout_ms);
        let writer = Writer {
            primary: primary.clone(),
            rx,
            max_batch: cfg.max_batch,
            wait_timeout_ms: redis.wait_timeout_ms,
            confirmed: Vec::new(),
        };
        let reader = Reader {
            primary: primary.clone(),
            rx: lookup_rx,
            max_batch: cfg.max_batch,
            read_timeout,
        };
        Ok((
            RedisKv {
                primary,
                tx,
                lookups,
                commit_timeout: Duration::from_millis(cfg.commit_timeout_ms),
                read_timeout,
            },
            Tasks {
                writer,
                reader,
                refresh: redis.status_interval(),
            },
        ))
    }

    async fn on_primary<T, F, Fut>(&self, f: F) -> Result<T, KvError>
    where
        F: Fn(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        on_primary(&self.primary, self.read_timeout, f).await
    }

    pub(super) async fn get(&self, full: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.on_primary(|mut c| async move {
            redis::cmd("GET")
                .arg(full)
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
        })
        .await
    }

    pub(super) async fn scan(
        &self,
        prefix: &str,
        cursor: u64,
    ) -> Result<(Vec<String>, u64), KvError> {
        let pattern = &format!("{prefix}*");
        self.on_primary(|mut c| async move {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(200)
                .query_async(&mut c)
                .await?;
            Ok((keys, next))
        })
        .await
    }

    /// The key and byte counts in `meta`; `None` when Redis cannot say.
    pub(super) async fn meta(&self, meta: &str) -> (Option<i64>, Option<i64>) {
        // Status must answer quickly: one short try, no riding out a
        // failover as a plugin's read does.
        let read = self.on_primary(|mut c| async move {
            redis::cmd("HMGET")
                .arg(meta)
                .arg("keys")
                .arg("bytes")
                .query_async::<(Option<i64>, Option<i64>)>(&mut c)
                .await
        });
        match tokio::time::timeout(Duration::from_millis(500), read).await {
            Ok(Ok((k, b))) => (Some(k.unwrap_or(0)), Some(b.unwrap_or(0))),
            _ => (None, None),
        }
    }

    /// Commit `writes` (keys under `prefix`) with `marker`: all or none,
    /// once, replicated.
    pub(super) async fn commit(
        &self,
        prefix: &str,
        meta: &Arc<str>,
        writes: &Writes,
        marker: Marker,
    ) -> Result<(), KvError> {
        let mut keys = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        for (key, op) in writes.iter() {
            keys.push(format!("{prefix}{key}"));
            ops.push(match op {
                Op::Set { value } => ("s", Some(value.clone())),
                Op::Increment { delta } => ("i", Some(delta.to_string().into_bytes())),
                Op::Delete => ("d", None),
            });
        }
        let item = Item::Commit(Commit {
            marker: marker.key,
            marker_ttl_secs: marker.ttl_secs,
            keep_marker: marker.keep,
            meta: meta.clone(),
            keys,
            ops,
        });
        self.write(item).await.map(|_| ())
    }

    /// Write `record` at `key` for `ttl_secs` unless the key holds a
    /// value, replicated: `None` when written, else the value held.
    pub(super) async fn journal(
        &self,
        key: &str,
        ttl_secs: u64,
        record: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let item = Item::Journal {
            key: key.to_owned(),
            ttl_secs,
            record,
        };
        match self.write(item).await? {
            Written::Done => Ok(None),
            Written::Held(v) => Ok(Some(v)),
        }
    }

    async fn write(&self, item: Item) -> Result<Written, KvError> {
        let shutting_down = || KvError::Unavailable("the state store is shutting down".into());
        let (reply, answer) = oneshot::channel();
        let request = Request {
            item,
            deadline: Instant::now() + self.commit_timeout,
            reply,
        };
        self.tx.send(request).await.map_err(|_| shutting_down())?;
        answer.await.unwrap_or_else(|_| Err(shutting_down()))
    }

    /// The value at `key`, read with the other lookups of the moment in
    /// one `MGET`.
    pub(super) async fn lookup(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let shutting_down = || KvError::Unavailable("the state store is shutting down".into());
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            key: key.to_owned(),
            reply,
        };
        self.lookups
            .send(lookup)
            .await
            .map_err(|_| shutting_down())?;
        answer.await.unwrap_or_else(|_| Err(shutting_down()))
    }
}

/// Run `f` on the current primary's connection, trying again (a failure
/// that may mean a failover drops the link first) until `timeout`: a
/// failover of a few seconds delays a read instead of failing it, so a
/// plugin does not retry, and dead-letter, its deliveries through one.
async fn on_primary<T, F, Fut>(primary: &Primary, timeout: Duration, f: F) -> Result<T, KvError>
where
    F: Fn(redis::aio::MultiplexedConnection) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    });
    loop {
        let attempt = async {
            let link = primary.get().await?;
            match f(link.conn()).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    let e = SpoolError::from_redis(&link.addr, e);
                    if e.is_failover() {
                        primary.invalidate(link.generation, &e).await;
                    }
                    Err(e)
                }
            }
        };
        let e = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(KvError::Unavailable(format!(
                    "the state store did not answer in {} ms",
                    timeout.as_millis()
                )));
            }
        };
        let wake = tokio::time::Instant::now() + backoff.next_fixed();
        if !e.is_transient() || wake >= deadline {
            return Err(KvError::Unavailable(format!("the state store: {e}")));
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// One lookup waiting for the batcher.
struct Lookup {
    key: String,
    reply: oneshot::Sender<Result<Option<Vec<u8>>, KvError>>,
}

/// Answers the lookups queued while the last `MGET` was out with one more.
struct Reader {
    primary: Arc<Primary>,
    rx: mpsc::Receiver<Lookup>,
    max_batch: usize,
    read_timeout: Duration,
}

impl Reader {
    async fn run(mut self, cancel: CancellationToken) {
        while let Some(batch) = next_batch(&mut self.rx, self.max_batch, &cancel).await {
            let keys: Vec<&str> = batch.iter().map(|l| l.key.as_str()).collect();
            let keys = &keys;
            let values = on_primary(&self.primary, self.read_timeout, |mut c| async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut c)
                    .await
            })
            .await;
            let values = match values {
                Ok(v) if v.len() != batch.len() => Err(KvError::Unavailable(format!(
                    "the state store answered {} values for {} keys",
                    v.len(),
                    batch.len()
                ))),
                other => other,
            };
            match values {
                Ok(values) => {
                    for (l, v) in batch.into_iter().zip(values) {
                        let _ = l.reply.send(Ok(v));
                    }
                }
                Err(e) => {
                    for l in batch {
                        let _ = l.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Keep the link checked (still the primary, the replicas' count raised)
/// and resolved before the first commit needs it.
async fn refresh_loop(primary: Arc<Primary>, every: Duration, cancel: CancellationToken) {
    let mut ticker = crate::sync::Ticker::new(every);
    while ticker.tick(&cancel).await {
        primary.refresh().await;
        let _ = primary.get().await;
    }
}
