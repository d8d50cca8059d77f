//! Effectively once on a deduplicated route (DESIGN.md §10).
//!
//! Each delivery is keyed (its message id, a header or a JSON pointer into
//! its body) and the key hashed with the queue into one Redis key,
//! `warren:dedup:<queue>:<hash>`, which holds nothing, a journal record or
//! the done mark `1`, for the window:
//!
//! - nothing: invoke the plugin; if it acks with outputs, write the
//!   journal record (its outputs, with deterministic message ids, and its
//!   key-value writes) unless the key holds one already, `WAIT`ed like a
//!   spool append; publish the outputs; apply the writes and set the done
//!   mark, atomically and once; ack;
//! - a journal record: the plugin ran and Warren stopped before it
//!   finished: publish the recorded outputs again, apply the recorded
//!   writes with the done mark (a no-op if they were applied), ack;
//! - done: ack without invoking.
//!
//! So the plugin runs twice only if Warren dies between invoking it and
//! writing the record, and its writes apply once whatever dies when. Only
//! an `ack` completes a key: a retried or dead-lettered delivery leaves it
//! untouched, so the retry, or a redrive of the dead letter, runs again.
//!
//! Two copies of one key in this process at once are handled one after the
//! other (the second finds the first's record), so a message published
//! twice runs the plugin once. Across processes the journal write decides:
//! the record written first is the one every copy publishes and applies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kv::{DedupKey, KvError, Op, Recorded, Store, Writes};
use crate::message::{HeaderValue, OutboundMessage};
use crate::plugins::manifest::{Dedup, DedupSource, OnStoreDown};
use crate::plugins::{self, Plugin};
use crate::sync::lock;

/// Counter: deliveries acked without invoking the plugin because their key
/// was done within the window, by `queue`.
pub const SKIPPED: &str = "warren_dedup_skipped_total";
/// Counter: deliveries whose recorded effects were replayed instead of
/// invoking the plugin (Warren stopped between journal and done), by
/// `queue`.
pub const REPLAYED: &str = "warren_dedup_replayed_total";
/// Counter: deliveries of a deduplicated route without a key, handled at
/// least once, by `queue`.
pub const NO_KEY: &str = "warren_dedup_no_key_total";
/// Counter: deliveries handled without deduplication because the store
/// could not be reached (`on-store-down = "at-least-once"`), by `queue`.
pub const UNRECORDED: &str = "warren_dedup_unrecorded_total";

/// HELP text of the counters above.
pub(crate) fn describe() {
    use metrics::describe_counter;
    describe_counter!(
        SKIPPED,
        "Deliveries acked without running the plugin: their key was handled within the window, by queue."
    );
    describe_counter!(
        REPLAYED,
        "Deliveries whose recorded outputs and writes were replayed instead of running the plugin, by queue."
    );
    describe_counter!(
        NO_KEY,
        "Deliveries of a deduplicated route without a key, handled at least once, by queue."
    );
    describe_counter!(
        UNRECORDED,
        "Deliveries handled without deduplication because the store was down, by queue."
    );
}

/// Slots in [`RouteDedup::busy`] past which released ones are swept.
const BUSY_SWEEP_AT: usize = 4096;

/// A deduplicated route's settings, store and keys in flight.
pub(crate) struct RouteDedup {
    queue: String,
    source: DedupSource,
    window: Duration,
    on_store_down: OnStoreDown,
    store: Store,
    /// Keys being handled in this process now.
    busy: Mutex<HashMap<[u8; 16], Arc<tokio::sync::Mutex<()>>>>,
    /// Since when the store has been unreachable and deliveries run at
    /// least once; `None` while it answers.
    down_since: Mutex<Option<Instant>>,
    counters: Counters,
}

/// The route's counters, resolved once.
struct Counters {
    skipped: metrics::Counter,
    replayed: metrics::Counter,
    no_key: metrics::Counter,
    unrecorded: metrics::Counter,
}

/// A delivery's key: the hash that names it in Redis.
#[derive(Clone)]
pub(crate) struct Keyed {
    hash: [u8; 16],
    key: DedupKey,
}

/// The journal record of one delivery's effects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) outputs: Vec<OutboundMessage>,
    writes: Vec<(String, RecordedOp)>,
}

/// A key-value write as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
enum RecordedOp {
    Set {
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete,
    Increment {
        delta: i64,
    },
}

/// What the store says about a delivery, once it answered.
pub(crate) enum Found {
    /// Handle it as a route without deduplication would.
    Plain,
    /// New: invoke the plugin. Holds the key for this process until dropped.
    New(Keyed, KeyGuard),
    /// Handled before and not finished: replay the record.
    Journal(Keyed, KeyGuard, Record),
    /// Done within the window.
    Done,
}

/// This process's claim on a key; the next copy waits for it.
pub(crate) struct KeyGuard {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl RouteDedup {
    pub(crate) fn new(queue: &str, dedup: &Dedup, store: Store) -> Result<RouteDedup, String> {
        Ok(RouteDedup {
            queue: queue.to_owned(),
            source: dedup.source()?,
            window: dedup.window()?,
            on_store_down: dedup.on_store_down,
            store,
            busy: Mutex::default(),
            down_since: Mutex::default(),
            counters: Counters {
                skipped: metrics::counter!(SKIPPED, "queue" => queue.to_owned()),
                replayed: metrics::counter!(REPLAYED, "queue" => queue.to_owned()),
                no_key: metrics::counter!(NO_KEY, "queue" => queue.to_owned()),
                unrecorded: metrics::counter!(UNRECORDED, "queue" => queue.to_owned()),
            },
        })
    }

    /// The store records and completions go to.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Since when deliveries have run at least once for want of the store.
    pub(crate) fn unrecorded_since(&self) -> Option<Instant> {
        *lock(&self.down_since)
    }

    /// `d`'s key, if it has one.
    pub(crate) fn key_of(&self, d: &plugins::Delivery) -> Option<String> {
        match &self.source {
            DedupSource::MessageId => d.properties.message_id.clone().filter(|s| !s.is_empty()),
            DedupSource::Header(name) => d.properties.header(name).and_then(header_text),
            DedupSource::JsonPointer(p) => {
                let v: serde_json::Value = serde_json::from_slice(&d.body).ok()?;
                match v.pointer(p)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                }
            }
        }
        .filter(|k| !k.is_empty())
    }

    fn keyed(&self, raw: &str) -> Keyed {
        let hash = digest(&[b"key", self.queue.as_bytes(), raw.as_bytes()]);
        Keyed {
            hash,
            key: DedupKey {
                key: format!("warren:dedup:{}:{}", self.queue, hex(&hash)),
                window: self.window,
            },
        }
    }

    /// Look `raw` up, holding the key in this process first (a copy being
    /// handled now finishes before this one looks). `Err` while the store
    /// cannot answer and the route pauses for it.
    pub(crate) async fn find(&self, raw: &str) -> Result<Found, KvError> {
        let keyed = self.keyed(raw);
        let guard = self.hold(keyed.hash).await;
        match self.store.recorded(&keyed.key).await {
            Ok(found) => {
                *lock(&self.down_since) = None;
                Ok(match found {
                    Recorded::Nothing => Found::New(keyed, guard),
                    Recorded::Done => Found::Done,
                    Recorded::Journal(bytes) => match decode(&bytes) {
                        Some(r) => Found::Journal(keyed, guard, r),
                        // Not a record Warren wrote: run the plugin, and
                        // the journal write keeps what is there.
                        None => Found::New(keyed, guard),
                    },
                })
            }
            Err(e @ KvError::Unavailable(_)) => match self.on_store_down {
                OnStoreDown::Pause => Err(e),
                OnStoreDown::AtLeastOnce => {
                    lock(&self.down_since).get_or_insert_with(Instant::now);
                    self.counters.unrecorded.increment(1);
                    Ok(Found::Plain)
                }
            },
            Err(e) => Err(e),
        }
    }

    async fn hold(&self, hash: [u8; 16]) -> KeyGuard {
        let slot = {
            let mut busy = lock(&self.busy);
            // Drop slots nobody holds or waits for, now and then rather
            // than on every delivery: the map is at most a few prefetches.
            if busy.len() >= BUSY_SWEEP_AT {
                busy.retain(|_, m| Arc::strong_count(m) > 1);
            }
            busy.entry(hash).or_default().clone()
        };
        KeyGuard {
            _held: slot.lock_owned().await,
        }
    }

    pub(crate) fn count_skipped(&self) {
        self.counters.skipped.increment(1);
    }

    pub(crate) fn count_replayed(&self) {
        self.counters.replayed.increment(1);
    }

    pub(crate) fn count_no_key(&self) {
        self.counters.no_key.increment(1);
    }
}

impl Keyed {
    /// The Redis key and window.
    pub(crate) fn key(&self) -> &DedupKey {
        &self.key
    }

    /// The base of the `Idempotency-Key` of the delivery's outbound calls.
    pub(crate) fn idempotency_base(&self) -> String {
        hex(&self.hash)
    }

    /// Give each output without a message id one derived from the key and
    /// the output's place, so a replayed output is the same message.
    pub(crate) fn stamp(&self, outputs: &mut [OutboundMessage]) {
        for (i, out) in outputs.iter_mut().enumerate() {
            if out.properties.message_id.is_none() {
                let n = (i as u64).to_be_bytes();
                out.properties.message_id = Some(uuid_of(digest(&[b"output", &self.hash, &n])));
            }
        }
    }
}

impl Record {
    pub(crate) fn new(outputs: Vec<OutboundMessage>, writes: &Writes) -> Record {
        let writes = writes
            .iter()
            .map(|(k, op)| {
                let op = match op {
                    Op::Set { value } => RecordedOp::Set {
                        value: value.clone(),
                    },
                    Op::Delete => RecordedOp::Delete,
                    Op::Increment { delta } => RecordedOp::Increment { delta: *delta },
                };
                (k.to_owned(), op)
            })
            .collect();
        Record { outputs, writes }
    }

    /// The recorded writes, to apply.
    pub(crate) fn writes(&self) -> Writes {
        Writes::from_ops(self.writes.iter().map(|(k, op)| {
            let op = match op {
                RecordedOp::Set { value } => Op::Set {
                    value: value.clone(),
                },
                RecordedOp::Delete => Op::Delete,
                RecordedOp::Increment { delta } => Op::Increment { delta: *delta },
            };
            (k.clone(), op)
        }))
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| format!("cannot encode the journal record: {e}"))
    }
}

/// A record from its bytes; `None` if they are not one.
pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
    serde_json::from_slice(bytes).ok()
}

/// The plugin's key-value namespace if the record or the delivery writes.
pub(crate) fn namespace<'a>(
    plugin: &'a Plugin,
    writes: &Writes,
) -> Option<&'a crate::kv::Namespace> {
    if writes.is_empty() { None } else { plugin.kv() }
}

fn header_text(v: &HeaderValue) -> Option<String> {
    match v {
        HeaderValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        HeaderValue::Bool(b) => Some(b.to_string()),
        HeaderValue::U64(n) => Some(n.to_string()),
        _ => v
            .as_str()
            .map(str::to_owned)
            .or_else(|| v.as_i64().map(|n| n.to_string())),
    }
}

/// The first 16 bytes of SHA-256 over `parts`, each length-prefixed so
/// that no two lists of parts collide by concatenation.
fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `bytes` as a UUID of version 8 (custom), RFC 9562.
fn uuid_of(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageProperties;

    fn route(key: &str) -> RouteDedup {
        let dedup = Dedup {
            key: key.into(),
            window: "1h".into(),
            on_store_down: OnStoreDown::Pause,
        };
        RouteDedup::new("orders", &dedup, Store::memory(Default::default())).unwrap()
    }

    fn delivery(id: Option<&str>, body: &str) -> plugins::Delivery {
        let mut properties = MessageProperties {
            message_id: id.map(str::to_owned),
            ..Default::default()
        };
        properties.set_header("order", HeaderValue::I64(17));
        plugins::Delivery {
            body: bytes::Bytes::from(body.to_owned()),
            exchange: String::new(),
            routing_key: "orders".into(),
            queue: "orders".into(),
            properties,
            redelivered: false,
            attempt: 1,
        }
    }

    #[test]
    fn keys_come_from_the_message_id_a_header_or_the_body() {
        let d = delivery(Some("m-1"), r#"{"order": {"id": 42, "ref": "a7"}}"#);
        assert_eq!(route("message-id").key_of(&d).as_deref(), Some("m-1"));
        assert_eq!(route("header:order").key_of(&d).as_deref(), Some("17"));
        assert_eq!(route("json:/order/id").key_of(&d).as_deref(), Some("42"));
        assert_eq!(route("json:/order/ref").key_of(&d).as_deref(), Some("a7"));
        let bare = delivery(None, "not json");
        assert_eq!(route("message-id").key_of(&bare), None);
        assert_eq!(route("header:missing").key_of(&bare), None);
        assert_eq!(route("json:/order/id").key_of(&bare), None);
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = Dedup {
            key: "body".into(),
            window: "an hour".into(),
            on_store_down: OnStoreDown::Pause,
        };
        let problems = bad.problems();
        assert!(problems[0].contains("dedup.key \"body\""), "{problems:?}");
        assert!(
            problems[1].contains("dedup.window \"an hour\""),
            "{problems:?}"
        );
        let ok = Dedup {
            key: "json:/id".into(),
            window: "7d".into(),
            on_store_down: OnStoreDown::AtLeastOnce,
        };
        assert_eq!(ok.window(), Ok(Duration::from_secs(7 * 86_400)));
        assert!(ok.problems().is_empty());
    }

    #[test]
    fn output_ids_are_the_same_for_the_same_key_and_place_only() {
        let r = route("message-id");
        let out = |id: Option<&str>| OutboundMessage {
            exchange: String::new(),
            routing_key: "out".into(),
            properties: MessageProperties {
                message_id: id.map(str::to_owned),
                ..Default::default()
            },
            body: bytes::Bytes::new(),
        };
        let mut a = vec![out(None), out(None), out(Some("own"))];
        let mut b = a.clone();
        r.keyed("m-1").stamp(&mut a);
        r.keyed("m-1").stamp(&mut b);
        assert_eq!(a, b);
        assert_ne!(a[0].properties.message_id, a[1].properties.message_id);
        assert_eq!(a[2].properties.message_id.as_deref(), Some("own"));
        let mut c = vec![out(None)];
        r.keyed("m-2").stamp(&mut c);
        assert_ne!(c[0].properties.message_id, a[0].properties.message_id);
        let id = a[0].properties.message_id.clone().unwrap();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 8);
    }

    #[test]
    fn a_record_keeps_outputs_and_writes() {
        let mut txn = crate::kv::Txn::new(Default::default());
        txn.add("n", 2).unwrap();
        txn.set("s", b"\x00\xffbytes".to_vec()).unwrap();
        txn.delete("gone").unwrap();
        let writes = txn.take();
        let outputs = vec![OutboundMessage {
            exchange: "x".into(),
            routing_key: "k".into(),
            properties: MessageProperties::default(),
            body: bytes::Bytes::from_static(b"\x01body"),
        }];
        let record = Record::new(outputs, &writes);
        let back = decode(&record.encode().unwrap()).unwrap();
        assert_eq!(back, record);
        let again: Vec<_> = back
            .writes()
            .iter()
            .map(|(k, op)| (k.to_owned(), op.clone()))
            .collect();
        let before: Vec<_> = writes
            .iter()
            .map(|(k, op)| (k.to_owned(), op.clone()))
            .collect();
        assert_eq!(again, before);
        assert_eq!(decode(b"1"), None);
    }

    #[tokio::test]
    async fn a_second_copy_waits_for_the_first_and_finds_it_done() {
        let r = Arc::new(route("message-id"));
        let Found::New(keyed, guard) = r.find("m-1").await.unwrap() else {
            panic!("a new key is new");
        };
        let second = tokio::spawn({
            let r = r.clone();
            async move { matches!(r.find("m-1").await, Ok(Found::Done)) }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second copy waits for the first");
        r.store()
            .complete(keyed.key(), None, &Writes::default())
            .await
            .unwrap();
        drop(guard);
        assert!(second.await.unwrap(), "then finds it done");
    }
}
