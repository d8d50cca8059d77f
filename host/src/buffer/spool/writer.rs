//! The writer: group-commits appends, each batch one script call and one
//! `WAIT` for the replicas, retried on the re-resolved primary.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use super::EntryId;
use super::shared::{Shared, stream_id_ms};
use crate::backoff::{Backoff, BackoffConfig};
use crate::buffer::error::RedisFailure;
use crate::buffer::{SpoolError, metric};

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

pub(super) struct AppendRequest {
    pub(super) id: Uuid,
    pub(super) payload: Vec<u8>,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<Result<EntryId, SpoolError>>,
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
}

impl Writer {
    pub(super) async fn run(
        self,
        mut rx: mpsc::Receiver<AppendRequest>,
        cancel: CancellationToken,
    ) {
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
                Err(failure) => {
                    failure.repair(&self.shared.primary).await;
                    let e = failure.error;
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
    ) -> Result<Vec<Result<EntryId, SpoolError>>, RedisFailure> {
        let shared = &self.shared;
        let link = shared
            .primary
            .get()
            .await
            .map_err(RedisFailure::resolving)?;
        let wait_for = link.wait_for();
        let pipe = append_pipeline(shared, batch, wait_for);
        let mut conn = link.conn();
        // Held until depth and bytes include this batch, so a concurrent
        // depth read from Redis is not stored over them.
        let mutation = shared.begin_mutation();
        let reply: Result<Vec<Value>, _> = pipe.query_async(&mut conn).await;
        let ids = appended_ids(&link.addr, wait_for, reply).map_err(|error| RedisFailure {
            error,
            generation: link.generation,
        })?;
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
