//! The drainer's Redis side: the lease scripts, reading a page of the
//! stream, deleting the confirmed prefix, and moving an undecodable entry
//! aside. Every failure names the primary link it happened on
//! ([`RedisFailure`]), so a failover invalidates that link only.

use std::sync::Arc;

use redis::Value;
use tracing::{debug, error};

use super::{DrainPublisher, Drainer};
use crate::buffer::error::RedisFailure;
use crate::buffer::spool::{Shared, refresh_depth};
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

/// A spool entry: its stream id, and the payload size the byte counter
/// holds for it.
pub(super) struct Entry {
    pub(super) stream_id: String,
    pub(super) size: u64,
}

/// A page of entries, each decoded or with why it cannot be.
pub(super) type ReadResult = Result<Vec<(Entry, Result<OutboundMessage, String>)>, RedisFailure>;
pub(super) type DeleteResult = Result<(), DeleteFailed>;

/// A delete that failed: why, and the confirmed entries it could not
/// delete, to be deleted later.
pub(super) struct DeleteFailed {
    pub(super) failure: RedisFailure,
    pub(super) entries: Vec<Entry>,
}

/// Read up to `count` entries after `after` (from the head if `None`).
pub(super) async fn read_entries(
    shared: Arc<Shared>,
    after: Option<String>,
    count: usize,
) -> ReadResult {
    let link = shared
        .primary
        .get()
        .await
        .map_err(RedisFailure::resolving)?;
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
        .map_err(|e| RedisFailure::on(&link, e))?;
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
pub(super) async fn delete_entries(shared: Arc<Shared>, confirmed: Vec<Entry>) -> DeleteResult {
    if confirmed.is_empty() {
        return Ok(());
    }
    let link = match shared.primary.get().await {
        Ok(link) => link,
        Err(e) => {
            return Err(DeleteFailed {
                failure: RedisFailure::resolving(e),
                entries: confirmed,
            });
        }
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
        Err(e) => Err(DeleteFailed {
            failure: RedisFailure::on(&link, e),
            entries: confirmed,
        }),
    };
    drop(mutation);
    result
}

impl<P: DrainPublisher> Drainer<P> {
    /// Delete the confirmed entries an earlier delete could not; on failure
    /// they stay in `unsettled`.
    pub(super) async fn delete_unsettled(&mut self) -> Result<(), RedisFailure> {
        let entries = std::mem::take(&mut self.unsettled);
        delete_entries(self.shared.clone(), entries).await.map_err(
            |DeleteFailed { failure, entries }| {
                self.unsettled = entries;
                failure
            },
        )
    }

    /// Move an undecodable entry aside (it is deleted in order like a
    /// confirmed one).
    pub(super) async fn park_corrupt(
        &self,
        entry: &Entry,
        detail: &str,
    ) -> Result<(), RedisFailure> {
        error!(stream = %self.shared.key, id = %entry.stream_id, %detail, corrupt = %self.corrupt_key, "Spool entry cannot be decoded; moving it aside.");
        let link = self
            .shared
            .primary
            .get()
            .await
            .map_err(RedisFailure::resolving)?;
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
            .map_err(|e| RedisFailure::on(&link, e))?;
        Ok(())
    }

    pub(super) async fn extend_lease(&self) -> Result<bool, RedisFailure> {
        let link = self
            .shared
            .primary
            .get()
            .await
            .map_err(RedisFailure::resolving)?;
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
            .map_err(|e| RedisFailure::on(&link, e))?;
        Ok(held == 1)
    }

    pub(super) async fn release_lease(&self) {
        let Some(link) = self.shared.primary.peek() else {
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
