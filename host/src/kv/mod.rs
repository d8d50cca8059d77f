//! Key-value state for plugins, committed with the delivery.
//!
//! A plugin reads and writes its own namespace (`warren:kv:<plugin>:`)
//! through `wasi:keyvalue` or Warren's resource-free `kv` interface. Reads
//! go to Redis at once; writes are collected per delivery in a [`Txn`]
//! (reads see them) and reach Redis only when the delivery succeeds:
//! after its outputs are confirmed and before its ack, in one atomic
//! script with the other deliveries' commits of the moment, `WAIT`ed for
//! the replicas like a spool append. A retry, reject or trap discards
//! them.
//!
//! Owns: the `[kv]` section, the store (Redis through the spool's primary
//! discovery, or memory for `warren invoke` and tests), the group-
//! committing writer and per-plugin counters. Does not decide when to
//! commit (dispatch does) nor run plugins.
//!
//! # Why a script and not `MULTI`/`EXEC`
//! A commit whose reply is lost (a failover between `EXEC` and `WAIT`'s
//! answer) must be retried without applying increments twice. The commit
//! script writes a marker with the writes, atomically, and skips a commit
//! whose marker exists; a `MULTI` block cannot make its writes conditional
//! on a key it reads. Markers are deleted with the next batch once their
//! commit is confirmed, and expire on their own as a backstop.
//!
//! - `txn`: one delivery's pending writes and limits ([`Txn`], [`Writes`]).
//! - `store`: [`Store`] and a plugin's [`Namespace`] in it.
//! - `redis`: reads (deduplication lookups batched) on Redis.
//! - `writer`: the group-committing writer of commits and journal records.

mod redis;
mod store;
mod txn;
mod writer;

use std::path::PathBuf;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use crate::buffer::SpoolConfig;
use crate::secret::{Secret, redacted_url, redacted_urls};

pub use store::{DONE, DedupKey, KvPluginStatus, KvTask, Namespace, Recorded, Store};
pub use txn::{KvError, KvLimits, Op, Seen, Txn, Writes, parse_int};

/// `[kv]`: where plugins' key-value state lives and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct KvConfig {
    /// Sentinel addresses (`redis://host:port`) of the store. Empty, with
    /// `url` empty too: the spool's Redis (its sentinels or URL,
    /// credentials and TLS), the default.
    #[serde(serialize_with = "redacted_urls")]
    pub sentinels: Vec<String>,
    /// Sentinel master name with `sentinels`; empty: the spool's.
    pub master_name: String,
    /// A single Redis for the store, used when `sentinels` is empty: not
    /// highly available.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// ACL user on the store's data nodes; unset: the spool's.
    pub username: Option<String>,
    /// Password on the store's data nodes; unset: the spool's.
    pub password: Option<Secret>,
    /// File holding that password; instead of `password`.
    pub password_file: Option<PathBuf>,
    /// Longest key, bytes.
    pub max_key_bytes: usize,
    /// Longest value, bytes.
    pub max_value_bytes: usize,
    /// Most writes (`set`, `delete`, `increment` calls) one delivery may
    /// make.
    pub max_writes: u32,
    /// Most key and value bytes one delivery may write.
    pub max_write_bytes: usize,
    /// Most deliveries' commits sent in one script call and one `WAIT`.
    pub max_batch: usize,
    /// How long a read may wait for Redis (a failover in progress) before
    /// it fails in the guest as `unavailable`, ms.
    pub read_timeout_ms: u64,
    /// How long one commit may wait for Redis (queueing, a re-resolved
    /// primary, replicas) before the delivery backs off and tries again,
    /// ms. The delivery stays unacknowledged meanwhile.
    pub commit_timeout_ms: u64,
}

impl Default for KvConfig {
    fn default() -> Self {
        let l = KvLimits::default();
        Self {
            sentinels: Vec::new(),
            master_name: String::new(),
            url: String::new(),
            username: None,
            password: None,
            password_file: None,
            max_key_bytes: l.max_key_bytes,
            max_value_bytes: l.max_value_bytes,
            max_writes: l.max_writes,
            max_write_bytes: l.max_write_bytes,
            max_batch: 256,
            read_timeout_ms: 5000,
            commit_timeout_ms: 5000,
        }
    }
}

impl KvConfig {
    /// The limits every plugin's state gets.
    pub fn limits(&self) -> KvLimits {
        KvLimits {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
            max_writes: self.max_writes,
            max_write_bytes: self.max_write_bytes,
        }
    }

    /// The Redis settings of the store: the spool's, with this section's
    /// address and credentials where it sets them.
    pub fn redis(&self, spool: &SpoolConfig) -> SpoolConfig {
        let mut cfg = spool.clone();
        if !self.sentinels.is_empty() {
            cfg.sentinels = self.sentinels.clone();
            if !self.master_name.is_empty() {
                cfg.master_name = self.master_name.clone();
            }
        } else if !self.url.is_empty() {
            cfg.sentinels = Vec::new();
            cfg.url = self.url.clone();
            cfg.min_replicas = None;
        }
        if self.username.is_some() {
            cfg.username = self.username.clone();
        }
        if self.password.is_some() || self.password_file.is_some() {
            cfg.password = self.password.clone();
            cfg.password_file = self.password_file.clone();
        }
        cfg
    }

    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_key_bytes == 0 || self.max_value_bytes == 0 {
            out.push("kv.max-key-bytes and kv.max-value-bytes must be at least 1".into());
        }
        if self.max_writes == 0 || self.max_write_bytes == 0 {
            out.push("kv.max-writes and kv.max-write-bytes must be at least 1".into());
        }
        if self.max_batch == 0 {
            out.push("kv.max-batch must be at least 1".into());
        }
        if self.commit_timeout_ms == 0 || self.read_timeout_ms == 0 {
            out.push("kv.commit-timeout-ms and kv.read-timeout-ms must be at least 1".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            out.push("kv: set password or password-file, not both".into());
        }
        if !self.sentinels.is_empty() && !self.url.is_empty() {
            out.push("kv: set sentinels or url, not both".into());
        }
        out
    }
}

/// Metric names (Prometheus), defined in one place.
pub mod metric {
    /// Counter by plugin: deliveries whose writes were committed.
    pub const COMMITS: &str = "warren_kv_commits_total";
    /// Counter by plugin: keys written by committed deliveries.
    pub const WRITES: &str = "warren_kv_writes_total";
    /// Counter by plugin: write calls of deliveries that did not succeed
    /// (retried, rejected, trapped), discarded.
    pub const DISCARDED: &str = "warren_kv_discarded_writes_total";
    /// Counter: commit attempts that failed (Redis unreachable, not
    /// replicated in time); the delivery is held and tries again.
    pub const COMMIT_FAILURES: &str = "warren_kv_commit_failures_total";
    /// Histogram: seconds a successful commit took, replicas included.
    pub const COMMIT_SECONDS: &str = "warren_kv_commit_seconds";

    /// HELP text of every metric above.
    pub(crate) fn describe() {
        use metrics::{describe_counter, describe_histogram};
        describe_counter!(COMMITS, "Deliveries whose key-value writes were committed.");
        describe_counter!(WRITES, "Keys written by committed deliveries.");
        describe_counter!(
            DISCARDED,
            "Key-value write calls of deliveries that did not succeed, discarded."
        );
        describe_counter!(
            COMMIT_FAILURES,
            "Key-value commit attempts that failed; the delivery is held and tries again."
        );
        describe_histogram!(
            COMMIT_SECONDS,
            metrics::Unit::Seconds,
            "Seconds a key-value commit took, replicas' confirmation included."
        );
        metrics::counter!(COMMIT_FAILURES).increment(0);
    }
}
