//! The group-committing writer: deliveries' key-value commits and journal
//! records, queued by many deliveries at once, sent to Redis as one script
//! call and one `WAIT` per batch, as the spool's writer appends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::txn::KvError;
use crate::backoff::{Backoff, BackoffConfig};
use crate::buffer::{Primary, SpoolError};

/// Applies a batch atomically. Two kinds of entries, in the order queued:
///
/// - `c`, a commit: skipped (0) if its marker holds `1` (it was applied),
///   refused (an error text, nothing written) if an increment meets a
///   value that is not an integer or would overflow, else applied (1): its
///   writes, its plugin's key and byte counts, and its marker set to `1`
///   (replacing a journal record held there).
///   KEYS: its marker, its plugin's meta hash, its keys. ARGV: `c`, the
///   marker's time to live in seconds, the number of keys and, per key,
///   an op: `s` value, `i` delta, or `d`.
/// - `j`, a journal record: written (1) with its time to live unless its
///   key holds a value already, which is returned instead (a record of
///   another copy of the message, or `1` if that one completed).
///   KEYS: its key. ARGV: `j`, the time to live in seconds, the record.
const BATCH_SCRIPT: &str = r"
local k, a = 1, 1
local out = {}
while a <= #ARGV do
  if ARGV[a] == 'j' then
    local cur = redis.call('GET', KEYS[k])
    if cur then
      out[#out + 1] = cur
    else
      redis.call('SET', KEYS[k], ARGV[a + 2], 'EX', ARGV[a + 1])
      out[#out + 1] = 1
    end
    k, a = k + 1, a + 3
  else
    local marker, meta, ttl, n = KEYS[k], KEYS[k + 1], ARGV[a + 1], tonumber(ARGV[a + 2])
    local k0, a0 = k + 2, a + 3
    local ka, aa, bad = k0, a0, nil
    for i = 1, n do
      local op = ARGV[aa]
      if op == 'i' then
        local v = redis.call('GET', KEYS[ka])
        if v and not string.match(v, '^%-?%d+$') then
          bad = 'the value of ' .. KEYS[ka] .. ' is not a decimal integer'
        elseif math.abs(tonumber(v or '0')) + math.abs(tonumber(ARGV[aa + 1])) >= 9.2e18 then
          bad = 'incrementing ' .. KEYS[ka] .. ' would overflow'
        end
        aa = aa + 2
      elseif op == 's' then
        aa = aa + 2
      else
        aa = aa + 1
      end
      ka = ka + 1
    end
    if redis.call('GET', marker) == '1' then
      out[#out + 1] = 0
    elseif bad then
      out[#out + 1] = bad
    else
      local dk, db = 0, 0
      ka, aa = k0, a0
      for i = 1, n do
        local key, op = KEYS[ka], ARGV[aa]
        local had = redis.call('EXISTS', key)
        local before = 0
        if had == 1 then before = #key + redis.call('STRLEN', key) end
        if op == 's' then
          redis.call('SET', key, ARGV[aa + 1])
          aa = aa + 2
        elseif op == 'i' then
          redis.call('INCRBY', key, ARGV[aa + 1])
          aa = aa + 2
        else
          redis.call('DEL', key)
          aa = aa + 1
        end
        local has = redis.call('EXISTS', key)
        local after = 0
        if has == 1 then after = #key + redis.call('STRLEN', key) end
        dk = dk + has - had
        db = db + after - before
        ka = ka + 1
      end
      if dk ~= 0 then redis.call('HINCRBY', meta, 'keys', dk) end
      if db ~= 0 then redis.call('HINCRBY', meta, 'bytes', db) end
      redis.call('SET', marker, '1', 'EX', ttl)
      out[#out + 1] = 1
    end
    k, a = ka, aa
  end
end
return out
";

/// What a queued entry asks for.
pub(super) enum Item {
    Commit(Commit),
    /// Write `record` at `key` for `ttl_secs` unless the key holds a value.
    Journal {
        key: String,
        ttl_secs: u64,
        record: Vec<u8>,
    },
}

/// One delivery's writes and the marker that makes them apply once.
pub(super) struct Commit {
    pub(super) marker: String,
    pub(super) marker_ttl_secs: u64,
    /// Keep the marker until it expires (a deduplicated delivery's done
    /// mark) instead of deleting it once the commit is confirmed.
    pub(super) keep_marker: bool,
    pub(super) meta: Arc<str>,
    /// Full keys, and per key the op's code and argument.
    pub(super) keys: Vec<String>,
    pub(super) ops: Vec<(&'static str, Option<Vec<u8>>)>,
}

/// How an entry ended, once durable.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// Applied or recorded now, or (a commit) found applied before.
    Done,
    /// A journal record's key held this value already; nothing written.
    Held(Vec<u8>),
}

/// One entry waiting for the writer.
pub(super) struct Request {
    pub(super) item: Item,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<Result<Written, KvError>>,
}

/// What is queued on `rx`, at least one and at most `max`, waiting for the
/// first; `None` once cancelled or closed. Cancel-safe: `recv` loses
/// nothing when cancellation wins.
pub(super) async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    cancel: &CancellationToken,
) -> Option<Vec<T>> {
    let first = tokio::select! {
        biased;
        _ = cancel.cancelled() => return None,
        r = rx.recv() => r?,
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Commits queued entries in batches.
pub(super) struct Writer {
    pub(super) primary: Arc<Primary>,
    pub(super) rx: mpsc::Receiver<Request>,
    pub(super) max_batch: usize,
    pub(super) wait_timeout_ms: u64,
    /// Markers of confirmed commits, deleted with the next batch.
    pub(super) confirmed: Vec<String>,
}

impl Writer {
    pub(super) async fn run(mut self, cancel: CancellationToken, tasks: TaskTracker) {
        info!("Key-value store starting.");
        while let Some(batch) = next_batch(&mut self.rx, self.max_batch, &cancel).await {
            self.commit(batch).await;
        }
        // What was queued before shutdown: each bounded by its deadline.
        self.rx.close();
        let mut rest = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            rest.push(r);
        }
        while !rest.is_empty() {
            let n = rest.len().min(self.max_batch);
            let chunk: Vec<_> = rest.drain(..n).collect();
            self.commit(chunk).await;
        }
        tasks.close();
        tasks.wait().await;
        info!("Key-value store stopped.");
    }

    /// Commit `batch`, trying again on the re-resolved primary until each
    /// request's deadline or its delivery gave up waiting.
    async fn commit(&mut self, mut batch: Vec<Request>) {
        let mut last: Option<SpoolError> = None;
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(250),
        });
        loop {
            let now = Instant::now();
            let (gone, live): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|r| r.deadline <= now || r.reply.is_closed());
            for r in gone {
                let why = last
                    .as_ref()
                    .map_or_else(|| "queued too long".to_string(), ToString::to_string);
                let _ = r.reply.send(Err(KvError::Unavailable(format!(
                    "the state store did not take the write in time: {why}"
                ))));
            }
            batch = live;
            if batch.is_empty() {
                return;
            }
            match self.try_commit(&batch).await {
                Ok(results) => {
                    for (r, result) in batch.into_iter().zip(results) {
                        if let (Ok(_), Item::Commit(c)) = (&result, &r.item)
                            && !c.keep_marker
                        {
                            self.confirmed.push(c.marker.clone());
                        }
                        let _ = r.reply.send(result);
                    }
                    return;
                }
                Err(Failed { error, generation }) => {
                    if error.is_failover()
                        && let Some(g) = generation
                    {
                        self.primary.invalidate(g, &error).await;
                    }
                    debug!(%error, entries = batch.len(), "Key-value batch not durable; retrying.");
                    last = Some(error);
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

    /// One attempt: the batch script then `WAIT`, in one pipeline (with
    /// the markers of earlier confirmed commits deleted first).
    async fn try_commit(
        &mut self,
        batch: &[Request],
    ) -> Result<Vec<Result<Written, KvError>>, Failed> {
        let link = self.primary.get().await.map_err(|error| Failed {
            error,
            generation: None,
        })?;
        let wait_for = link.wait_for();
        let mut p = redis::pipe();
        p.ignore_errors();
        let confirmed = std::mem::take(&mut self.confirmed);
        if !confirmed.is_empty() {
            p.cmd("UNLINK").arg(&confirmed).ignore();
        }
        let script = p.cmd("EVAL").arg(BATCH_SCRIPT);
        let nkeys: usize = batch
            .iter()
            .map(|r| match &r.item {
                Item::Commit(c) => c.keys.len() + 2,
                Item::Journal { .. } => 1,
            })
            .sum();
        script.arg(nkeys);
        for r in batch {
            match &r.item {
                Item::Commit(c) => script.arg(&c.marker).arg(&*c.meta).arg(&c.keys),
                Item::Journal { key, .. } => script.arg(key),
            };
        }
        for r in batch {
            match &r.item {
                Item::Commit(c) => {
                    script.arg("c").arg(c.marker_ttl_secs).arg(c.keys.len());
                    for (code, arg) in &c.ops {
                        script.arg(*code);
                        if let Some(a) = arg {
                            script.arg(a.as_slice());
                        }
                    }
                }
                Item::Journal {
                    ttl_secs, record, ..
                } => {
                    script.arg("j").arg(*ttl_secs).arg(record.as_slice());
                }
            }
        }
        if wait_for > 0 {
            p.cmd("WAIT").arg(wait_for).arg(self.wait_timeout_ms);
        }
        let mut conn = link.conn();
        let reply: redis::RedisResult<Vec<Value>> = p.query_async(&mut conn).await;
        let outcome = read_reply(&link.addr, wait_for, batch, reply);
        if outcome.is_err() {
            // Not known to be deleted: try again with the next batch.
            self.confirmed = confirmed;
        }
        outcome.map_err(|error| Failed {
            error,
            generation: Some(link.generation),
        })
    }
}

/// Why a batch is not durable, and the link generation it failed on.
struct Failed {
    error: SpoolError,
    generation: Option<u64>,
}

/// Each entry's result from the script's reply, once `WAIT` (if any)
/// confirmed `wait_for` replicas; else why the batch is not durable.
fn read_reply(
    addr: &str,
    wait_for: u32,
    batch: &[Request],
    reply: redis::RedisResult<Vec<Value>>,
) -> Result<Vec<Result<Written, KvError>>, SpoolError> {
    let unexpected = |what: String| SpoolError::Command {
        addr: addr.to_owned(),
        source: redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected key-value batch reply",
            what,
        )),
    };
    let mut values = reply
        .map_err(|e| SpoolError::from_redis(addr, e))?
        .into_iter();
    let results = match values.next() {
        Some(Value::Array(rs)) if rs.len() == batch.len() => rs,
        Some(Value::ServerError(e)) => return Err(SpoolError::from_server(addr, e)),
        other => return Err(unexpected(format!("{other:?}"))),
    };
    if wait_for > 0 {
        crate::buffer::replicated(addr, wait_for, values.next())?;
    }
    results
        .into_iter()
        .zip(batch)
        .map(|(v, r)| match (v, &r.item) {
            (Value::Int(_), _) => Ok(Ok(Written::Done)),
            (Value::BulkString(b), Item::Commit(_)) => Ok(Err(KvError::Invalid(format!(
                "commit refused, nothing written: {}",
                String::from_utf8_lossy(&b)
            )))),
            (Value::BulkString(b), Item::Journal { .. }) => Ok(Ok(Written::Held(b))),
            (other, _) => Err(unexpected(format!("{other:?}"))),
        })
        .collect()
}
