//! Plain serde configuration for the spool and its drainer. Validated up
//! front by [`SpoolConfig::validate`], which reports every problem at once.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SpoolError;
use crate::secret::Secret;

/// Where the spool's Redis is and how the spool behaves.
///
/// Either `sentinels` (production: highly available) or `url` (development:
/// one plain Redis, not highly available) must be set, not both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Sentinel addresses, e.g. `redis://127.0.0.1:26379`. Asked in turn.
    pub sentinels: Vec<String>,
    /// The Sentinel master name.
    pub master_name: String,
    /// A single Redis URL instead of Sentinel (development only).
    pub url: Option<String>,
    /// This Warren instance's id; part of the default stream key. Each host
    /// has its own stream so that per-host publish order is kept.
    pub host_id: String,
    /// The stream key; default `warren:spool:{host_id}`.
    pub stream_key: Option<String>,
    /// Replicas that must confirm (`WAIT`) an append before it is
    /// acknowledged. Default 1 with Sentinel, 0 with `url`.
    pub min_replicas: Option<u32>,
    /// Wait for every replica that was online when the primary was resolved
    /// (at least `min_replicas`), not just `min_replicas`. Default true: it
    /// is what makes a manual `SENTINEL FAILOVER` lose no acknowledged
    /// append (see `buffer::sentinel`); false keeps appends flowing while
    /// one replica lags, at the risk of losing acknowledged appends in a
    /// manual failover.
    pub wait_for_all_replicas: bool,
    /// `WAIT` timeout. The connection's response timeout is set above it.
    pub wait_timeout_ms: u64,
    /// Timeout to connect to a node (sentinel or primary).
    pub connect_timeout_ms: u64,
    /// How long an append may take in total (queueing, retries on the
    /// re-resolved primary) before it is refused.
    pub append_timeout_ms: u64,
    /// Size limit in entries; past it appends are refused.
    pub max_entries: u64,
    /// Size limit in payload bytes; past it appends are refused.
    pub max_bytes: u64,
    /// Most appends committed in one pipeline (one `WAIT`).
    pub max_batch: usize,
    /// Appends that may wait for the writer before `append` itself waits.
    pub queue_capacity: usize,
    /// How often depth, oldest age and the primary's role are refreshed,
    /// and this host's claim on its stream is renewed.
    pub status_interval_ms: u64,
    /// ACL user on the data nodes; with `url`, the URL's user when unset.
    pub username: Option<String>,
    /// Password on the data nodes; with `url`, the URL's password when unset.
    pub password: Option<Secret>,
    /// File holding the data nodes' password, instead of `password`.
    pub password_file: Option<PathBuf>,
    /// ACL user on the sentinels; the sentinel URLs' user when unset.
    pub sentinel_username: Option<String>,
    /// Password on the sentinels; the sentinel URLs' password when unset.
    pub sentinel_password: Option<Secret>,
    /// File holding the sentinels' password, instead of `sentinel_password`.
    pub sentinel_password_file: Option<PathBuf>,
    /// CA certificate (PEM) for `rediss://`; the system's roots when unset.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers with `tls-auth-clients yes`.
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// This host's claim on its stream (`{stream}:owner`) lives this long
    /// unless renewed (every `status_interval_ms`); once it has lapsed,
    /// another host may adopt the stream and drain it.
    pub owner_lease_ms: u64,
    /// Adopt and drain the `warren:spool:*` streams of hosts whose claim
    /// has lapsed (see `buffer::adopt`).
    pub adopt_orphans: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            url: None,
            host_id: "warren".into(),
            stream_key: None,
            min_replicas: None,
            wait_for_all_replicas: true,
            wait_timeout_ms: 400,
            connect_timeout_ms: 1000,
            append_timeout_ms: 5000,
            max_entries: 1_000_000,
            max_bytes: 1 << 30,
            max_batch: 512,
            queue_capacity: 16_384,
            status_interval_ms: 1000,
            username: None,
            password: None,
            password_file: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            owner_lease_ms: 10_000,
            adopt_orphans: true,
        }
    }
}

impl SpoolConfig {
    /// A Sentinel-backed spool (production).
    pub fn sentinel(
        sentinels: impl IntoIterator<Item = impl Into<String>>,
        master_name: impl Into<String>,
        host_id: impl Into<String>,
    ) -> Self {
        Self {
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            master_name: master_name.into(),
            host_id: host_id.into(),
            ..Self::default()
        }
    }

    /// A spool on one plain Redis (development: not highly available).
    pub fn plain(url: impl Into<String>, host_id: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            host_id: host_id.into(),
            ..Self::default()
        }
    }

    /// The stream key this host spools to.
    pub fn stream_key(&self) -> String {
        self.stream_key
            .clone()
            .unwrap_or_else(|| format!("warren:spool:{}", self.host_id))
    }

    /// Replicas each append must reach.
    pub fn min_replicas(&self) -> u32 {
        self.min_replicas
            .unwrap_or(if self.url.is_some() { 0 } else { 1 })
    }

    /// True when Sentinel is configured (highly available).
    pub fn is_sentinel(&self) -> bool {
        self.url.is_none()
    }

    /// Above the WAIT timeout, so a slow `WAIT` is answered, not cut off
    /// (redis-rs defaults to 500 ms).
    pub(crate) fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.wait_timeout_ms.saturating_add(1000))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn append_timeout(&self) -> Duration {
        Duration::from_millis(self.append_timeout_ms)
    }

    pub(crate) fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms.max(50))
    }

    /// Every problem with this config, at once.
    pub fn validate(&self) -> Result<(), SpoolError> {
        let mut problems = Vec::new();
        match (&self.url, self.sentinels.is_empty()) {
            (Some(_), false) => problems.push("set either `url` or `sentinels`, not both".into()),
            (None, true) => problems.push("set `sentinels` (or `url` for development)".into()),
            _ => {}
        }
        if self.url.is_none() && self.master_name.is_empty() {
            problems.push("`master_name` is empty".into());
        }
        if self.host_id.is_empty() && self.stream_key.is_none() {
            problems.push("`host_id` is empty".into());
        }
        if self.stream_key.as_deref() == Some("") {
            problems.push("`stream_key` is empty".into());
        }
        if self.min_replicas() > 0 && self.wait_timeout_ms == 0 {
            problems.push("`wait_timeout_ms` must be > 0 (0 would block forever)".into());
        }
        if self.max_entries == 0 || self.max_bytes == 0 {
            problems.push("`max_entries` and `max_bytes` must be > 0".into());
        }
        if self.max_batch == 0 || self.queue_capacity == 0 {
            problems.push("`max_batch` and `queue_capacity` must be > 0".into());
        }
        if self.append_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            problems.push("`append_timeout_ms` and `connect_timeout_ms` must be > 0".into());
        }
        if self.owner_lease_ms < self.status_interval_ms.saturating_mul(3) {
            problems.push(
                "`owner_lease_ms` must be at least 3 × `status_interval_ms` (it is renewed every interval)".into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpoolError::InvalidConfig(problems))
        }
    }

    /// The owner-claim key of `stream`.
    pub(crate) fn owner_key(stream: &str) -> String {
        format!("{stream}:owner")
    }
}

/// How the drainer republishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainerConfig {
    /// Entries read per `XRANGE`.
    pub batch: usize,
    /// Publishes awaiting their confirm at once, at most. 1 gives strict
    /// order even across publish failures; larger windows are needed for
    /// throughput (see the drainer's module doc for what a failure does to
    /// order). Each failed pass halves the window in use; a window's worth
    /// of confirms in a row doubles it back up to this.
    pub window: usize,
    /// Lease time-to-live; renewed every third of it.
    pub lease_ttl_ms: u64,
    /// How long the drainer waits without progress (no send completing, no
    /// confirm arriving, the broker not blocking publishes) before it gives
    /// the broker up for failed and republishes from the first unconfirmed
    /// entry. Progress, not age: a slow broker confirming a full window in
    /// several times this long is waited for.
    pub stall_timeout_ms: u64,
    /// First pause after a failed publish; doubles up to `backoff_max_ms`,
    /// with full jitter.
    pub backoff_min_ms: u64,
    /// Longest pause after failed publishes.
    pub backoff_max_ms: u64,
    /// How often an idle drainer looks at the stream (appends by this process
    /// also wake it at once).
    pub idle_poll_ms: u64,
}

impl Default for DrainerConfig {
    fn default() -> Self {
        Self {
            batch: 1024,
            window: 1024,
            lease_ttl_ms: 10_000,
            stall_timeout_ms: 30_000,
            backoff_min_ms: 200,
            backoff_max_ms: 10_000,
            idle_poll_ms: 500,
        }
    }
}

impl DrainerConfig {
    /// Every problem with this config, at once.
    pub fn validate(&self) -> Result<(), SpoolError> {
        let mut problems = Vec::new();
        if self.batch == 0 || self.window == 0 {
            problems.push("`batch` and `window` must be > 0".to_owned());
        }
        if self.lease_ttl_ms < 300 {
            problems.push("`lease_ttl_ms` must be at least 300".to_owned());
        }
        if self.stall_timeout_ms == 0 {
            problems.push("`stall_timeout_ms` must be > 0".to_owned());
        }
        if self.backoff_min_ms == 0 || self.backoff_max_ms < self.backoff_min_ms {
            problems.push("need 0 < `backoff_min_ms` <= `backoff_max_ms`".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpoolError::InvalidConfig(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem() {
        let cfg = SpoolConfig {
            url: Some("redis://x".into()),
            sentinels: vec!["redis://y".into()],
            max_entries: 0,
            ..SpoolConfig::default()
        };
        match cfg.validate() {
            Err(SpoolError::InvalidConfig(p)) => assert_eq!(p.len(), 2, "{p:?}"),
            other => panic!("unexpected {other:?}"),
        }
        let plain = SpoolConfig::plain("redis://127.0.0.1", "h1");
        assert_eq!(plain.min_replicas(), 0);
        assert_eq!(plain.stream_key(), "warren:spool:h1");
        assert!(plain.validate().is_ok());
        assert_eq!(
            SpoolConfig::sentinel(["redis://s"], "m", "h").min_replicas(),
            1
        );
    }
}
