//! The store plugins' state lives in, and one plugin's namespace in it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::redis::{Marker, RedisKv, Tasks};
use super::txn::{KvError, KvLimits, Op, Writes, parse_int};
use super::{KvConfig, metric};
use crate::buffer::SpoolConfig;
use crate::sync::lock;

/// Where plugins' state lives. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    limits: KvLimits,
    stats: std::sync::Mutex<BTreeMap<String, Arc<Stats>>>,
}

enum Backend {
    Redis(RedisKv),
    /// `warren invoke` and tests: a map of full keys, committed at once.
    Memory(std::sync::Mutex<BTreeMap<String, Vec<u8>>>),
}

/// The background work of a Redis store: the commit writer, primary
/// refreshes and `+switch-master`. Run it until shutdown, after dispatch
/// stops (in-flight deliveries commit during the grace period).
pub struct KvTask {
    tasks: Tasks,
}

impl KvTask {
    pub async fn run(self, cancel: CancellationToken) {
        self.tasks.run(cancel).await;
    }
}

/// Counters of one plugin's state, across reloads.
struct Stats {
    commits: metrics::Counter,
    writes: metrics::Counter,
    discarded: metrics::Counter,
    commits_n: AtomicU64,
    writes_n: AtomicU64,
    discarded_n: AtomicU64,
}

impl Stats {
    /// Counters that count nowhere: a done mark without writes.
    fn unlabelled() -> Stats {
        Stats {
            commits: metrics::Counter::noop(),
            writes: metrics::Counter::noop(),
            discarded: metrics::Counter::noop(),
            commits_n: AtomicU64::new(0),
            writes_n: AtomicU64::new(0),
            discarded_n: AtomicU64::new(0),
        }
    }
}

/// One plugin's state as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KvPluginStatus {
    /// Keys the plugin holds (kept by the commit script; `None` when the
    /// store could not be asked).
    pub keys: Option<i64>,
    /// Key and value bytes it holds.
    pub bytes: Option<i64>,
    /// Deliveries whose writes were committed since start.
    pub commits: u64,
    /// Keys written by them.
    pub writes: u64,
    /// Write calls of failed deliveries, discarded.
    pub discarded_writes: u64,
}

impl Store {
    /// The store `cfg` describes, on the spool's Redis unless it names
    /// another. No I/O yet: the primary is resolved on first use.
    pub fn redis(cfg: &KvConfig, spool: &SpoolConfig) -> Result<(Store, KvTask), String> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let (redis, tasks) = RedisKv::new(cfg, &cfg.redis(spool)).map_err(|e| e.to_string())?;
        let store = Self::with(Backend::Redis(redis), cfg.limits());
        Ok((store, KvTask { tasks }))
    }

    /// A store in memory holding `seed` (full keys), for `warren invoke`
    /// and tests.
    pub fn memory(limits: KvLimits) -> Store {
        Self::with(Backend::Memory(std::sync::Mutex::default()), limits)
    }

    fn with(backend: Backend, limits: KvLimits) -> Store {
        Store {
            inner: Arc::new(Inner {
                backend,
                limits,
                stats: std::sync::Mutex::default(),
            }),
        }
    }

    pub fn limits(&self) -> KvLimits {
        self.inner.limits
    }

    /// Plugin `plugin`'s namespace.
    pub fn namespace(&self, plugin: &str) -> Namespace {
        let stats = lock(&self.inner.stats)
            .entry(plugin.to_string())
            .or_insert_with(|| {
                let label = plugin.to_string();
                Arc::new(Stats {
                    commits: metrics::counter!(metric::COMMITS, "plugin" => label.clone()),
                    writes: metrics::counter!(metric::WRITES, "plugin" => label.clone()),
                    discarded: metrics::counter!(metric::DISCARDED, "plugin" => label),
                    commits_n: AtomicU64::new(0),
                    writes_n: AtomicU64::new(0),
                    discarded_n: AtomicU64::new(0),
                })
            })
            .clone();
        Namespace {
            store: self.clone(),
            prefix: Arc::from(format!("warren:kv:{plugin}:")),
            meta: Arc::from(format!("warren:kv-meta:{plugin}")),
            stats,
        }
    }

    /// Every plugin's state that has a namespace in this process.
    pub async fn status(&self) -> BTreeMap<String, KvPluginStatus> {
        let names: Vec<String> = lock(&self.inner.stats).keys().cloned().collect();
        let each = names.into_iter().map(|name| async move {
            let status = self.namespace(&name).status().await;
            (name, status)
        });
        futures::future::join_all(each).await.into_iter().collect()
    }
}

/// What a value at a deduplicated message's key holds: a done mark or a
/// journal record (which never is the done mark's one byte).
pub const DONE: &[u8] = b"1";

/// What the store holds for a deduplicated message's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing: the message has not been handled within the window.
    Nothing,
    /// A journal record: handled, its effects not yet all applied.
    Journal(Vec<u8>),
    /// Done: its effects were applied.
    Done,
}

impl Recorded {
    fn of(value: Option<Vec<u8>>) -> Recorded {
        match value {
            None => Recorded::Nothing,
            Some(v) if v == DONE => Recorded::Done,
            Some(v) => Recorded::Journal(v),
        }
    }
}

/// A deduplicated message's key and how long its records live.
#[derive(Debug, Clone)]
pub struct DedupKey {
    /// The full Redis key.
    pub key: String,
    pub window: std::time::Duration,
}

impl DedupKey {
    fn ttl_secs(&self) -> u64 {
        self.window.as_secs().max(1)
    }
}

impl Store {
    /// What is recorded at `key`, read with other lookups of the moment.
    pub async fn recorded(&self, key: &DedupKey) -> Result<Recorded, KvError> {
        let value = match &self.inner.backend {
            Backend::Redis(r) => r.lookup(&key.key).await?,
            Backend::Memory(m) => lock(m).get(&key.key).cloned(),
        };
        Ok(Recorded::of(value))
    }

    /// Write the journal `record` at `key` for its window, replicated,
    /// unless something is recorded there already: `Nothing` when this
    /// record was written, else what was there (another copy's record, or
    /// done).
    pub async fn journal(&self, key: &DedupKey, record: Vec<u8>) -> Result<Recorded, KvError> {
        let held = match &self.inner.backend {
            Backend::Redis(r) => r.journal(&key.key, key.ttl_secs(), record).await?,
            Backend::Memory(m) => {
                let mut m = lock(m);
                match m.get(&key.key) {
                    Some(v) => Some(v.clone()),
                    None => {
                        m.insert(key.key.clone(), record);
                        None
                    }
                }
            }
        };
        Ok(Recorded::of(held))
    }

    /// Apply `writes` in `ns` (none without state) and mark `key` done
    /// for its window, atomically and once: a second call for the same key
    /// applies nothing.
    pub async fn complete(
        &self,
        key: &DedupKey,
        ns: Option<&Namespace>,
        writes: &Writes,
    ) -> Result<(), KvError> {
        let marker = Marker {
            key: key.key.clone(),
            ttl_secs: key.ttl_secs(),
            keep: true,
        };
        match ns {
            Some(ns) => ns.commit_marked(writes, marker).await,
            None if writes.is_empty() => {
                let bare = Namespace {
                    store: self.clone(),
                    prefix: Arc::from(""),
                    meta: Arc::from(key.key.as_str()),
                    stats: Arc::new(Stats::unlabelled()),
                };
                bare.commit_marked(writes, marker).await
            }
            None => Err(KvError::Invalid(
                "the plugin serving now has no key-value state for the recorded writes".into(),
            )),
        }
    }
}

/// One plugin's keys: reads, and commits of its deliveries' writes.
#[derive(Clone)]
pub struct Namespace {
    store: Store,
    /// `warren:kv:<plugin>:`, before every key.
    prefix: Arc<str>,
    /// `warren:kv-meta:<plugin>`: the hash of its key and byte counts.
    meta: Arc<str>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Namespace {
    pub fn limits(&self) -> KvLimits {
        self.store.inner.limits
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The committed value of `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let full = self.full(key);
        match &self.store.inner.backend {
            Backend::Redis(r) => r.get(&full).await,
            Backend::Memory(m) => Ok(lock(m).get(&full).cloned()),
        }
    }

    /// Committed keys after `cursor` (0 to start); the next cursor is 0
    /// when there are no more. A key may come twice, as with `SCAN`.
    pub async fn scan(&self, cursor: u64) -> Result<(Vec<String>, u64), KvError> {
        let (full, next) = match &self.store.inner.backend {
            Backend::Redis(r) => r.scan(&self.prefix, cursor).await?,
            Backend::Memory(m) => {
                let keys = lock(m)
                    .keys()
                    .filter(|k| k.starts_with(&*self.prefix))
                    .cloned()
                    .collect();
                (keys, 0)
            }
        };
        let keys = full
            .into_iter()
            .filter_map(|k| k.strip_prefix(&*self.prefix).map(str::to_owned))
            .collect();
        Ok((keys, next))
    }

    /// Commit one delivery's `writes`: all of them or none, replicated
    /// like a spool append. `Err(Unavailable)` when Redis did not take
    /// them in `commit-timeout-ms` (the caller holds the delivery and
    /// tries again with the same `writes`, which is safe: a commit that
    /// did land is recognised by its id and not applied twice);
    /// `Err(Invalid)` when an increment met a value that is not an integer
    /// (another delivery set it since): nothing was written.
    pub async fn commit(&self, writes: &Writes) -> Result<(), KvError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_marked(writes, Marker::of(writes)).await
    }

    /// [`Namespace::commit`] under `marker`, also with no writes (a done
    /// mark alone).
    async fn commit_marked(&self, writes: &Writes, marker: Marker) -> Result<(), KvError> {
        let started = Instant::now();
        let result = match &self.store.inner.backend {
            Backend::Redis(r) => r.commit(&self.prefix, &self.meta, writes, marker).await,
            Backend::Memory(m) => commit_in_memory(&mut lock(m), &self.prefix, writes, &marker),
        };
        match &result {
            Ok(()) if !writes.is_empty() => {
                let n = writes.len() as u64;
                self.stats.commits.increment(1);
                self.stats.writes.increment(n);
                self.stats.commits_n.fetch_add(1, Ordering::Relaxed);
                self.stats.writes_n.fetch_add(n, Ordering::Relaxed);
                metrics::histogram!(metric::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
            }
            Ok(()) => {}
            Err(_) => metrics::counter!(metric::COMMIT_FAILURES).increment(1),
        }
        result
    }

    /// Count `calls` write calls of a delivery that did not succeed.
    pub fn discarded(&self, calls: u32) {
        if calls > 0 {
            self.stats.discarded.increment(calls.into());
            self.stats
                .discarded_n
                .fetch_add(calls.into(), Ordering::Relaxed);
        }
    }

    /// Keys, bytes and counters of this plugin's state.
    pub async fn status(&self) -> KvPluginStatus {
        let (keys, bytes) = match &self.store.inner.backend {
            Backend::Redis(r) => r.meta(&self.meta).await,
            Backend::Memory(m) => {
                let m = lock(m);
                let mine = m.iter().filter(|(k, _)| k.starts_with(&*self.prefix));
                let (n, b) = mine.fold((0i64, 0i64), |(n, b), (k, v)| {
                    (n + 1, b + (k.len() + v.len()) as i64)
                });
                (Some(n), Some(b))
            }
        };
        KvPluginStatus {
            keys,
            bytes,
            commits: self.stats.commits_n.load(Ordering::Relaxed),
            writes: self.stats.writes_n.load(Ordering::Relaxed),
            discarded_writes: self.stats.discarded_n.load(Ordering::Relaxed),
        }
    }

    /// Put `values` in the store at once (memory stores only: `warren
    /// invoke --kv-seed`).
    pub fn seed(&self, values: BTreeMap<String, Vec<u8>>) -> Result<(), KvError> {
        match &self.store.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                for (k, v) in values {
                    m.insert(self.full(&k), v);
                }
                Ok(())
            }
            Backend::Redis(_) => Err(KvError::Invalid(
                "only an in-memory store can be seeded".into(),
            )),
        }
    }
}

/// [`Namespace::commit`] on a map: skip if the marker says applied, check
/// every increment, then apply and set the marker. Markers never expire
/// here (tests and `warren invoke` only).
fn commit_in_memory(
    m: &mut BTreeMap<String, Vec<u8>>,
    prefix: &str,
    writes: &Writes,
    marker: &Marker,
) -> Result<(), KvError> {
    if m.get(&marker.key).map(Vec::as_slice) == Some(DONE) {
        return Ok(());
    }
    for (key, op) in writes.iter() {
        if let Op::Increment { .. } = op {
            parse_int(key, m.get(&format!("{prefix}{key}")).map(Vec::as_slice))?;
        }
    }
    for (key, op) in writes.iter() {
        let full = format!("{prefix}{key}");
        match op {
            Op::Set { value } => {
                m.insert(full, value.clone());
            }
            Op::Delete => {
                m.remove(&full);
            }
            Op::Increment { delta } => {
                let n = parse_int(key, m.get(&full).map(Vec::as_slice))?.saturating_add(*delta);
                m.insert(full, n.to_string().into_bytes());
            }
        }
    }
    if marker.keep {
        m.insert(marker.key.clone(), DONE.to_vec());
    }
    Ok(())
}
