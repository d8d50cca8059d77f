//! Plugins' state on Redis: reads on the current primary, and the writer
//! that commits deliveries' writes in batches, one script call and one
//! `WAIT` per batch, as the spool's writer appends.
//!
//! The primary is found and followed by the spool's discovery
//! ([`crate::buffer::Primary`]): the same Sentinel rules, credentials, TLS
//! and `WAIT` count (every replica online when the primary was resolved).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::KvConfig;
use super::txn::{KvError, Op, Writes};
use crate::backoff::{Backoff, BackoffConfig};
use crate::buffer::{Primary, SpoolConfig, SpoolError};

/// Applies a batch of commits atomically. Per commit: skipped (0) if its
/// marker exists, refused (an error text, nothing written) if an
/// increment meets a value that is not an integer or would overflow,
/// else applied (1): its writes, its plugin's key and byte counts, and
/// its marker.
///
/// KEYS, per commit: its marker, its plugin's meta hash, its keys.
/// ARGV: the marker's time to live in seconds; then per commit the number
/// of its keys and, per key, an op: `s` value, `i` delta, or `d`.
const COMMIT_SCRIPT: &str = r"
local ttl = ARGV[1]
local k, a = 1, 2
local out = {}
while a <= #ARGV do
  local marker, meta, n = KEYS[k], KEYS[k + 1], tonumber(ARGV[a])
  local k0, a0 = k + 2, a + 1
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
  if redis.call('EXISTS', marker) == 1 then
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
return out
";

/// How long a commit marker outlives its commit if the writer never
/// deletes it (it does, with the next batch, once the commit is
/// confirmed): longer than any delivery keeps retrying one commit.
const MARKER_TTL_SECS: u64 = 3600;

/// Reads, and the queue to the writer.
pub(super) struct RedisKv {
    primary: Arc<Primary>,
    tx: mpsc::Sender<Request>,
    commit_timeout: Duration,
    read_timeout: Duration,
}

/// One delivery's commit waiting for the writer.
struct Request {
    marker: String,
    meta: Arc<str>,
    /// Full keys, and per key the op's code and argument.
    keys: Vec<String>,
    ops: Vec<(&'static str, Option<Vec<u8>>)>,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), KvError>>,
}

impl RedisKv {
    pub(super) fn new(
        cfg: &KvConfig,
        redis: &SpoolConfig,
    ) -> Result<(RedisKv, Writer), SpoolError> {
        redis.validate()?;
        let primary = Arc::new(Primary::new(redis)?);
        let (tx, rx) = mpsc::channel(cfg.max_batch.saturating_mul(16).max(1));
        let writer = Writer {
            primary: primary.clone(),
            rx,
            max_batch: cfg.max_batch,
            wait_timeout_ms: redis.wait_timeout_ms,
            refresh: redis.status_interval(),
            confirmed: Vec::new(),
        };
        Ok((
            RedisKv {
                primary,
                tx,
                commit_timeout: Duration::from_millis(cfg.commit_timeout_ms),
                read_timeout: Duration::from_millis(cfg.read_timeout_ms),
            },
            writer,
        ))
    }

    /// Run `f` on the current primary's connection, trying again (a
    /// failure that may mean a failover drops the link first) until the
    /// read timeout: a failover of a few seconds delays a read instead of
    /// failing it, so a plugin does not retry, and dead-letter, its
    /// deliveries through one.
    async fn on_primary<T, F, Fut>(&self, f: F) -> Result<T, KvError>
    where
        F: Fn(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        });
        loop {
            let attempt = async {
                let link = self.primary.get().await?;
                match f(link.conn()).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        let e = SpoolError::from_redis(&link.addr, e);
                        if e.is_failover() {
                            self.primary.invalidate(link.generation, &e).await;
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
                        self.read_timeout.as_millis()
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

    pub(super) async fn commit(
        &self,
        prefix: &str,
        meta: &Arc<str>,
        writes: &Writes,
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
        let (reply, answer) = oneshot::channel();
        let request = Request {
            marker: format!("warren:kv-commit:{}", writes.id()),
            meta: meta.clone(),
            keys,
            ops,
            deadline: Instant::now() + self.commit_timeout,
            reply,
        };
        self.tx
            .send(request)
            .await
            .map_err(|_| KvError::Unavailable("the state store is shutting down".into()))?;
        answer.await.unwrap_or_else(|_| {
            Err(KvError::Unavailable(
                "the state store is shutting down".into(),
            ))
        })
    }
}

/// Commits queued deliveries' writes in batches.
pub(super) struct Writer {
    primary: Arc<Primary>,
    rx: mpsc::Receiver<Request>,
    max_batch: usize,
    wait_timeout_ms: u64,
    refresh: Duration,
    /// Markers of confirmed commits, deleted with the next batch.
    confirmed: Vec<String>,
}

impl Writer {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        info!("Key-value store starting.");
        let tasks = TaskTracker::new();
        tasks.spawn(self.primary.clone().watch_switch_master(cancel.clone()));
        tasks.spawn(refresh_loop(
            self.primary.clone(),
            self.refresh,
            cancel.clone(),
        ));
        loop {
            // Cancel-safe: `recv` loses nothing when another branch wins.
            let first = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = self.rx.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
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
                    "the state store did not take the commit in time: {why}"
                ))));
            }
            batch = live;
            if batch.is_empty() {
                return;
            }
            match self.try_commit(&batch).await {
                Ok(results) => {
                    for (r, result) in batch.into_iter().zip(results) {
                        if result.is_ok() {
                            self.confirmed.push(r.marker);
                        }
                        let _ = r.reply.send(result);
                    }
                    return;
                }
                Err((e, generation)) => {
                    if e.is_failover()
                        && let Some(g) = generation
                    {
                        self.primary.invalidate(g, &e).await;
                    }
                    debug!(error = %e, commits = batch.len(), "Key-value commit not durable; retrying.");
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

    /// One attempt: the commit script then `WAIT`, in one pipeline (with
    /// the markers of earlier confirmed commits deleted first).
    async fn try_commit(
        &mut self,
        batch: &[Request],
    ) -> Result<Vec<Result<(), KvError>>, (SpoolError, Option<u64>)> {
        let link = self.primary.get().await.map_err(|e| (e, None))?;
        let generation = Some(link.generation);
        let wait_for = link.wait_for();
        let mut p = redis::pipe();
        p.ignore_errors();
        let confirmed = std::mem::take(&mut self.confirmed);
        if !confirmed.is_empty() {
            p.cmd("UNLINK").arg(&confirmed).ignore();
        }
        let script = p.cmd("EVAL").arg(COMMIT_SCRIPT);
        let nkeys: usize = batch.iter().map(|r| r.keys.len() + 2).sum();
        script.arg(nkeys);
        for r in batch {
            script.arg(&r.marker).arg(&*r.meta).arg(&r.keys);
        }
        script.arg(MARKER_TTL_SECS);
        for r in batch {
            script.arg(r.keys.len());
            for (code, arg) in &r.ops {
                script.arg(*code);
                if let Some(a) = arg {
                    script.arg(a.as_slice());
                }
            }
        }
        if wait_for > 0 {
            p.cmd("WAIT").arg(wait_for).arg(self.wait_timeout_ms);
        }
        let mut conn = link.conn();
        let reply: redis::RedisResult<Vec<Value>> = p.query_async(&mut conn).await;
        let outcome = read_reply(&link.addr, wait_for, batch.len(), reply);
        if outcome.is_err() {
            // Not known to be deleted: try again with the next batch.
            self.confirmed = confirmed;
        }
        outcome.map_err(|e| (e, generation))
    }
}

/// Each commit's result from the script's reply, once `WAIT` (if any)
/// confirmed `wait_for` replicas; else why the batch is not durable.
fn read_reply(
    addr: &str,
    wait_for: u32,
    n: usize,
    reply: redis::RedisResult<Vec<Value>>,
) -> Result<Vec<Result<(), KvError>>, SpoolError> {
    let unexpected = |what: String| SpoolError::Command {
        addr: addr.to_owned(),
        source: redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected key-value commit reply",
            what,
        )),
    };
    let mut values = reply
        .map_err(|e| SpoolError::from_redis(addr, e))?
        .into_iter();
    let results = match values.next() {
        Some(Value::Array(rs)) if rs.len() == n => rs,
        Some(Value::ServerError(e)) => return Err(SpoolError::from_server(addr, e)),
        other => return Err(unexpected(format!("{other:?}"))),
    };
    if wait_for > 0 {
        crate::buffer::replicated(addr, wait_for, values.next())?;
    }
    results
        .into_iter()
        .map(|v| match v {
            Value::Int(_) => Ok(Ok(())),
            Value::BulkString(b) => Ok(Err(KvError::Invalid(format!(
                "commit refused, nothing written: {}",
                String::from_utf8_lossy(&b)
            )))),
            other => Err(unexpected(format!("{other:?}"))),
        })
        .collect()
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
