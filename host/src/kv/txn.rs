//! One delivery's key-value writes, before they commit: the pending
//! operations by key, the limits they are checked against, and what a
//! read sees through them.
//!
//! Pure bookkeeping: nothing here talks to Redis. A read that finds no
//! pending write for its key returns [`Seen::Committed`], and the caller
//! asks the store.

use std::collections::BTreeMap;

use serde::Serialize;

/// Why a key-value operation failed; the guest sees the same three kinds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A key or value over its size limit, or too many writes in one
    /// delivery.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An empty key, or an increment of a value that is not an integer.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store could not be reached, or there is none here.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Size limits of one plugin's state (`[kv]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Writes (`set`, `delete`, `increment` calls) one delivery may make.
    pub max_writes: u32,
    /// Key and value bytes one delivery may write in total.
    pub max_write_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 512,
            max_value_bytes: 1 << 20,
            max_writes: 1000,
            max_write_bytes: 8 << 20,
        }
    }
}

/// A pending write to one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    /// Set the value.
    Set {
        #[serde(serialize_with = "text_or_base64")]
        value: Vec<u8>,
    },
    /// Delete the key.
    Delete,
    /// Add to the integer already there at commit (absent counts as 0).
    /// Kept as a delta, not a value, so concurrent increments all count.
    Increment { delta: i64 },
}

/// A delivery's writes, ready to commit: one operation per key (later
/// writes to a key replace or fold into earlier ones), in key order, and
/// the id that recognises the commit if it is tried again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes {
    ops: BTreeMap<String, Op>,
    id: String,
}

impl Serialize for Writes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.ops.serialize(s)
    }
}

impl Writes {
    /// Writes as a journal record kept them, to apply again.
    pub fn from_ops(ops: impl IntoIterator<Item = (String, Op)>) -> Writes {
        Writes {
            ops: ops.into_iter().collect(),
            id: String::new(),
        }
    }

    /// Unique per delivery attempt: a retried commit carries the same.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Keys written.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Op)> {
        self.ops.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// What a read of a key sees in the delivery's pending writes.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// This delivery set it (or deleted it: `None`).
    Pending(Option<Vec<u8>>),
    /// This delivery incremented it: the committed value plus `delta`.
    Incremented { delta: i64 },
    /// Untouched: the committed value.
    Committed,
}

/// The writes one delivery has made so far, checked against its limits.
#[derive(Debug)]
pub struct Txn {
    writes: Writes,
    limits: KvLimits,
    /// Write calls made (each counts against `max_writes`).
    calls: u32,
    /// Key and value bytes written (against `max_write_bytes`).
    bytes: usize,
}

impl Txn {
    pub fn new(limits: KvLimits) -> Self {
        Self {
            writes: Writes::default(),
            limits,
            calls: 0,
            bytes: 0,
        }
    }

    /// Write calls made so far (also the ones a retry or trap discards).
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// The writes, leaving this transaction empty for the next delivery.
    pub fn take(&mut self) -> Writes {
        self.calls = 0;
        self.bytes = 0;
        let mut writes = std::mem::take(&mut self.writes);
        if !writes.is_empty() {
            writes.id = uuid::Uuid::new_v4().simple().to_string();
        }
        writes
    }

    /// A key's problem, if any: empty or over the limit.
    pub fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::Invalid("a key must not be empty".into()));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::LimitExceeded(format!(
                "key is {} bytes; the limit is {} (kv.max-key-bytes)",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    /// What a read of `key` sees among the pending writes.
    pub fn seen(&self, key: &str) -> Seen {
        match self.writes.ops.get(key) {
            Some(Op::Set { value }) => Seen::Pending(Some(value.clone())),
            Some(Op::Delete) => Seen::Pending(None),
            Some(Op::Increment { delta }) => Seen::Incremented { delta: *delta },
            None => Seen::Committed,
        }
    }

    /// Whether `key` exists once this delivery commits, when that does not
    /// depend on the committed value.
    pub fn pending_keys(&self) -> impl Iterator<Item = (&str, bool)> {
        self.writes
            .ops
            .iter()
            .map(|(k, op)| (k.as_str(), !matches!(op, Op::Delete)))
    }

    /// Count one write call of `bytes` key and value bytes.
    fn count(&mut self, bytes: usize) -> Result<(), KvError> {
        if self.calls >= self.limits.max_writes {
            return Err(KvError::LimitExceeded(format!(
                "at most {} writes per delivery (kv.max-writes)",
                self.limits.max_writes
            )));
        }
        if self.bytes + bytes > self.limits.max_write_bytes {
            return Err(KvError::LimitExceeded(format!(
                "at most {} bytes written per delivery (kv.max-write-bytes)",
                self.limits.max_write_bytes
            )));
        }
        self.calls += 1;
        self.bytes += bytes;
        Ok(())
    }

    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::LimitExceeded(format!(
                "value of {key:?} is {} bytes; the limit is {} (kv.max-value-bytes)",
                value.len(),
                self.limits.max_value_bytes
            )));
        }
        self.count(key.len() + value.len())?;
        self.writes.ops.insert(key.to_string(), Op::Set { value });
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), KvError> {
        self.check_key(key)?;
        self.count(key.len())?;
        self.writes.ops.insert(key.to_string(), Op::Delete);
        Ok(())
    }

    /// Add `delta` to `key`, where `committed` is the committed value when
    /// the pending writes do not decide it (the caller reads it first when
    /// [`Txn::seen`] says [`Seen::Committed`] or [`Seen::Incremented`]).
    /// Returns the value the delivery now sees.
    pub fn increment(
        &mut self,
        key: &str,
        delta: i64,
        committed: Option<&[u8]>,
    ) -> Result<i64, KvError> {
        let op = self.folded(key, delta)?;
        let now = match &op {
            Op::Increment { delta: total } => parse_int(key, committed)?
                .checked_add(*total)
                .ok_or_else(|| overflow(key))?,
            Op::Set { value } => parse_int(key, Some(value))?,
            Op::Delete => parse_int(key, None)?,
        };
        self.record(key, op)?;
        Ok(now)
    }

    /// Add `delta` to `key` at commit without knowing its committed value
    /// (`increment` without the answer).
    pub fn add(&mut self, key: &str, delta: i64) -> Result<(), KvError> {
        let op = self.folded(key, delta)?;
        self.record(key, op)
    }

    /// `key`'s pending write with `delta` added: a value this delivery
    /// wrote takes the sum, a deletion becomes `delta`, anything else stays
    /// a delta for the commit to add.
    fn folded(&self, key: &str, delta: i64) -> Result<Op, KvError> {
        self.check_key(key)?;
        Ok(match self.writes.ops.get(key) {
            Some(Op::Set { value }) => {
                let n = parse_int(key, Some(value))?
                    .checked_add(delta)
                    .ok_or_else(|| overflow(key))?;
                Op::Set {
                    value: n.to_string().into_bytes(),
                }
            }
            Some(Op::Delete) => Op::Set {
                value: delta.to_string().into_bytes(),
            },
            Some(Op::Increment { delta: before }) => Op::Increment {
                delta: before.checked_add(delta).ok_or_else(|| overflow(key))?,
            },
            None => Op::Increment { delta },
        })
    }

    /// Count and keep an increment's folded write.
    fn record(&mut self, key: &str, op: Op) -> Result<(), KvError> {
        self.count(key.len() + 20)?;
        self.writes.ops.insert(key.to_string(), op);
        Ok(())
    }
}

fn overflow(key: &str) -> KvError {
    KvError::Invalid(format!("incrementing {key:?} overflows a 64-bit integer"))
}

/// The integer a stored value holds (absent: 0), as `INCRBY` reads it.
pub fn parse_int(key: &str, value: Option<&[u8]>) -> Result<i64, KvError> {
    let Some(v) = value else { return Ok(0) };
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            KvError::Invalid(format!(
                "the value of {key:?} is not a decimal integer, so it cannot be incremented"
            ))
        })
}

/// A value as text when it is UTF-8, else as `{"base64": ..}`.
fn text_or_base64<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    match std::str::from_utf8(v) {
        Ok(text) => s.serialize_str(text),
        Err(_) => {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry(
                "base64",
                &base64::engine::general_purpose::STANDARD.encode(v),
            )?;
            m.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn() -> Txn {
        Txn::new(KvLimits {
            max_key_bytes: 8,
            max_value_bytes: 4,
            max_writes: 3,
            max_write_bytes: 100,
        })
    }

    #[test]
    fn reads_see_the_delivery_s_own_writes() {
        let mut t = txn();
        assert_eq!(t.seen("a"), Seen::Committed);
        t.set("a", b"1".to_vec()).unwrap();
        assert_eq!(t.seen("a"), Seen::Pending(Some(b"1".to_vec())));
        t.delete("a").unwrap();
        assert_eq!(t.seen("a"), Seen::Pending(None));
    }

    #[test]
    fn increments_stay_deltas_unless_the_delivery_set_the_value() {
        let mut t = txn();
        assert_eq!(t.increment("n", 2, Some(b"40")).unwrap(), 42);
        assert_eq!(t.increment("n", 1, Some(b"40")).unwrap(), 43);
        assert_eq!(t.seen("n"), Seen::Incremented { delta: 3 });
        let mut t = txn();
        t.set("n", b"5".to_vec()).unwrap();
        assert_eq!(t.increment("n", -7, Some(b"999")).unwrap(), -2);
        assert_eq!(t.seen("n"), Seen::Pending(Some(b"-2".to_vec())));
        let mut t = txn();
        t.delete("n").unwrap();
        assert_eq!(t.increment("n", 4, Some(b"999")).unwrap(), 4);
    }

    #[test]
    fn limits_and_bad_values_are_refused_naming_the_setting() {
        let mut t = txn();
        let e = t.set("too-long-key", b"1".to_vec()).unwrap_err();
        assert!(
            matches!(&e, KvError::LimitExceeded(m) if m.contains("kv.max-key-bytes")),
            "{e}"
        );
        let e = t.set("k", b"12345".to_vec()).unwrap_err();
        assert!(
            matches!(&e, KvError::LimitExceeded(m) if m.contains("kv.max-value-bytes")),
            "{e}"
        );
        assert!(matches!(t.set("", vec![]), Err(KvError::Invalid(_))));
        t.set("a", b"x".to_vec()).unwrap();
        let e = t.increment("a", 1, None).unwrap_err();
        assert!(
            matches!(&e, KvError::Invalid(m) if m.contains("not a decimal integer")),
            "{e}"
        );
        t.set("b", vec![]).unwrap();
        t.delete("c").unwrap();
        let e = t.delete("d").unwrap_err();
        assert!(
            matches!(&e, KvError::LimitExceeded(m) if m.contains("kv.max-writes")),
            "{e}"
        );
        assert_eq!(t.take().len(), 3);
        assert_eq!(t.calls(), 0);
    }

    #[test]
    fn add_folds_into_what_the_delivery_wrote_without_a_read() {
        let mut t = txn();
        t.add("n", 2).unwrap();
        t.add("n", 3).unwrap();
        assert_eq!(t.seen("n"), Seen::Incremented { delta: 5 });
        let mut t = txn();
        t.set("n", b"7".to_vec()).unwrap();
        t.add("n", -2).unwrap();
        assert_eq!(t.seen("n"), Seen::Pending(Some(b"5".to_vec())));
    }

    #[test]
    fn overflow_is_refused() {
        let mut t = txn();
        let max = i64::MAX.to_string();
        assert!(matches!(
            t.increment("n", 1, Some(max.as_bytes())),
            Err(KvError::Invalid(_))
        ));
    }
}
