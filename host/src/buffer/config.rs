//! `[spool]`: where the spool's Redis is and how the spool and its drainer
//! behave. [`SpoolConfig`] is the config section itself (`warren.toml` and
//! `WARREN_SPOOL_*`), and [`SpoolConfig::problems`] lists every problem at
//! once.

use std::path::PathBuf;
use std::time::Duration;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use super::SpoolError;
use crate::secret::{Secret, redact_url, redacted_url, redacted_urls};

/// `[spool]`: where outputs wait while the broker is down.
#[derive(Clone, PartialEq, Serialize, Deserialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct SpoolConfig {
    /// Sentinel addresses (`redis://host:port`), asked in turn. When empty,
    /// `url` is used.
    #[serde(serialize_with = "redacted_urls")]
    pub sentinels: Vec<String>,
    /// Sentinel master name.
    pub master_name: String,
    /// A single Redis for development: not highly available. Used when
    /// `sentinels` is empty.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// This host's id, part of the spool stream key (each host has its own
    /// stream, so per-host publish order is kept); default: host name.
    pub host_id: Option<String>,
    /// Stream key; default `warren:spool:<host-id>`.
    pub stream_key: Option<String>,
    /// Replicas that must confirm an append (default 1 with sentinels, 0
    /// with a plain URL).
    pub min_replicas: Option<u32>,
    /// Wait for every replica that was online when the primary was
    /// resolved (at least `min-replicas`), not just `min-replicas`: what
    /// makes a manual `SENTINEL FAILOVER` lose no acknowledged append.
    /// false keeps appends flowing while one replica lags, at the risk of
    /// losing acknowledged appends in a manual failover.
    pub wait_for_all_replicas: bool,
    /// `WAIT` timeout, ms. The connection's response timeout is set above
    /// it.
    pub wait_timeout_ms: u64,
    /// Limit on connecting to one node (sentinel or primary), ms.
    pub connect_timeout_ms: u64,
    /// How long an append may take in total (queueing, retries on the
    /// re-resolved primary) before it is refused, ms.
    pub append_timeout_ms: u64,
    /// Most entries the spool may hold; past it appends are refused.
    pub max_entries: u64,
    /// Most payload bytes the spool may hold; past it appends are refused.
    pub max_bytes: u64,
    /// Most appends committed in one pipeline (one `WAIT`).
    pub max_batch: usize,
    /// Appends that may wait for the writer before `append` itself waits.
    pub queue_capacity: usize,
    /// How often depth, oldest age and the primary's role are refreshed
    /// and this host's claim on its stream is renewed, ms.
    pub status_interval_ms: u64,
    /// Spooled messages the drainer keeps awaiting their confirm at once.
    /// 1 keeps strict order even when a republish fails mid-way; larger
    /// windows drain much faster, and a failed republish then comes again
    /// after the ones behind it. Each failed pass halves the window in
    /// use; a window's worth of confirms in a row doubles it back.
    pub drain_window: usize,
    /// How long the drainer waits with publishes in flight and no progress
    /// at all (no send completing, no confirm arriving, the broker not
    /// blocking publishes) before it republishes from the first
    /// unconfirmed entry, duplicating whatever the broker had routed, ms.
    /// Progress, not age: a slow broker is waited for; a dead one is
    /// noticed sooner, by the heartbeat.
    pub drain_stall_timeout_ms: u64,
    /// With entries in the spool and the broker connected, how long the
    /// drain may make no progress before `/ready` and `/status` list it as
    /// stalled (a `degraded` reason, `warren_spool_drain_stalled` = 1).
    pub drain_stalled_after_ms: u64,
    /// ACL user on the data nodes (with `url`, the URL's own user works too).
    pub username: Option<String>,
    /// Password on the data nodes (`requirepass`, or the ACL user's).
    pub password: Option<Secret>,
    /// File holding the data nodes' password (a mounted secret); instead of
    /// `password`.
    pub password_file: Option<PathBuf>,
    /// ACL user on the sentinels (the sentinel URLs' own user works too).
    pub sentinel_username: Option<String>,
    /// Password on the sentinels (their `requirepass`); the sentinel URLs'
    /// own password works too.
    pub sentinel_password: Option<Secret>,
    /// File holding the sentinels' password; instead of `sentinel-password`.
    pub sentinel_password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the Redis nodes' certificates; the
    /// system's roots when unset. TLS itself is on when the URLs use
    /// `rediss://`.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for Redis's `tls-auth-clients`.
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// How long this host's claim on its stream outlives it, ms: another
    /// host adopts and drains a stream whose owner has not renewed its
    /// claim (every `status-interval-ms`) for this long.
    pub owner_lease_ms: u64,
    /// Drain the streams of hosts that are gone (their claim expired).
    pub adopt_orphans: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        let drainer = DrainerConfig::default();
        Self {
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            url: "redis://127.0.0.1:6379".into(),
            host_id: None,
            stream_key: None,
            min_replicas: None,
            wait_for_all_replicas: true,
            wait_timeout_ms: 500,
            connect_timeout_ms: 1000,
            append_timeout_ms: 5000,
            max_entries: 1_000_000,
            max_bytes: 512 << 20,
            max_batch: 512,
            queue_capacity: 16_384,
            status_interval_ms: 1000,
            drain_window: drainer.window,
            drain_stall_timeout_ms: drainer.stall_timeout_ms,
            drain_stalled_after_ms: 30_000,
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

impl std::fmt::Debug for SpoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sentinels: Vec<String> = self.sentinels.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("SpoolConfig")
            .field("sentinels", &sentinels)
            .field("master_name", &self.master_name)
            .field("url", &redact_url(&self.url))
            .field("stream_key", &self.stream_key())
            .finish_non_exhaustive()
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
            host_id: Some(host_id.into()),
            ..Self::default()
        }
    }

    /// A spool on one plain Redis (development: not highly available).
    pub fn plain(url: impl Into<String>, host_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            host_id: Some(host_id.into()),
            ..Self::default()
        }
    }

    /// This host's id: `host-id`, else the machine's host name.
    pub fn host_id(&self) -> String {
        self.host_id.clone().unwrap_or_else(host_name)
    }

    /// The stream key this host spools to.
    pub fn stream_key(&self) -> String {
        self.stream_key
            .clone()
            .unwrap_or_else(|| format!("warren:spool:{}", self.host_id()))
    }

    /// Replicas each append must reach.
    pub fn min_replicas(&self) -> u32 {
        self.min_replicas.unwrap_or(u32::from(self.is_sentinel()))
    }

    /// True when Sentinel is configured (highly available).
    pub fn is_sentinel(&self) -> bool {
        !self.sentinels.is_empty()
    }

    /// The plain Redis URL when no sentinels are configured.
    pub(crate) fn plain_url(&self) -> Option<&str> {
        (!self.is_sentinel()).then_some(self.url.as_str())
    }

    /// The drainer's settings: the `drain-*` keys over its defaults.
    pub fn drainer(&self) -> DrainerConfig {
        DrainerConfig {
            window: self.drain_window,
            stall_timeout_ms: self.drain_stall_timeout_ms,
            ..DrainerConfig::default()
        }
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

    /// The addresses in use: the sentinels, or `url` when there are none.
    fn addresses(&self) -> Vec<&String> {
        if self.sentinels.is_empty() {
            vec![&self.url]
        } else {
            self.sentinels.iter().collect()
        }
    }

    /// Every problem with this section, at once: its values, and the
    /// addresses, TLS files and secret files they name.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.address_problems();
        out.extend(self.secret_problems());
        out.extend(self.value_problems());
        out
    }

    /// The values' own problems, for the subsystem's constructors: the
    /// files the section names are read, and reported, by the spool's
    /// dialer when it is built.
    pub fn validate(&self) -> Result<(), SpoolError> {
        let problems = self.value_problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpoolError::InvalidConfig(problems))
        }
    }

    /// Problems with the values themselves (no file is read).
    fn value_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.is_sentinel() && self.master_name.is_empty() {
            out.push("spool.master-name is empty".into());
        }
        if self.host_id.as_deref() == Some("") && self.stream_key.is_none() {
            out.push("spool.host-id is empty".into());
        }
        if self.stream_key.as_deref() == Some("") {
            out.push("spool.stream-key is empty".into());
        }
        for (key, value) in [
            ("wait-timeout-ms", self.wait_timeout_ms),
            ("connect-timeout-ms", self.connect_timeout_ms),
            ("append-timeout-ms", self.append_timeout_ms),
            ("max-entries", self.max_entries),
            ("max-bytes", self.max_bytes),
            ("max-batch", self.max_batch as u64),
            ("queue-capacity", self.queue_capacity as u64),
            ("drain-window", self.drain_window as u64),
            ("drain-stall-timeout-ms", self.drain_stall_timeout_ms),
            ("drain-stalled-after-ms", self.drain_stalled_after_ms),
        ] {
            if value == 0 {
                out.push(format!("spool.{key} must be at least 1"));
            }
        }
        let min_lease = 3 * self.status_interval().as_millis() as u64;
        if self.owner_lease_ms < min_lease {
            out.push(format!(
                "spool.owner-lease-ms must be at least {min_lease} (it is renewed every {} ms)",
                min_lease / 3
            ));
        }
        out
    }

    /// Problems with the addresses and TLS settings.
    fn address_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let addresses = self.addresses();
        for s in &addresses {
            if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
                out.push(format!(
                    "spool address {:?} must start with redis:// or rediss://",
                    redact_url(s)
                ));
            }
        }
        let tls = addresses
            .iter()
            .filter(|s| s.starts_with("rediss://"))
            .count();
        if tls != 0 && tls != addresses.len() {
            out.push(
                "spool addresses mix redis:// and rediss://: TLS is on for every node or none"
                    .into(),
            );
        }
        let tls_files = [
            ("tls-ca-file", &self.tls_ca_file),
            ("tls-cert-file", &self.tls_cert_file),
            ("tls-key-file", &self.tls_key_file),
        ];
        for (key, path) in tls_files {
            let Some(path) = path else { continue };
            if tls == 0 {
                out.push(format!(
                    "spool.{key} is set but the spool addresses use redis://; write rediss:// to turn TLS on"
                ));
            }
            if let Err(e) = std::fs::metadata(path) {
                out.push(format!("cannot read spool.{key} {}: {e}", path.display()));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            out.push("spool.tls-cert-file and spool.tls-key-file go together".into());
        }
        out
    }

    /// Problems with the credentials.
    fn secret_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let secrets = [
            (
                "password",
                &self.password,
                "password-file",
                &self.password_file,
            ),
            (
                "sentinel-password",
                &self.sentinel_password,
                "sentinel-password-file",
                &self.sentinel_password_file,
            ),
        ];
        for (key, value, file_key, file) in secrets {
            match (value, file) {
                (Some(_), Some(_)) => {
                    out.push(format!("set spool.{key} or spool.{file_key}, not both"))
                }
                (None, Some(path)) => {
                    if let Err(e) =
                        crate::secret::read_secret_file(&format!("spool.{file_key}"), path)
                    {
                        out.push(e);
                    }
                }
                _ => {}
            }
        }
        if self.sentinels.is_empty()
            && (self.sentinel_username.is_some()
                || self.sentinel_password.is_some()
                || self.sentinel_password_file.is_some())
        {
            out.push(
                "spool.sentinel-username and spool.sentinel-password need spool.sentinels".into(),
            );
        }
        out
    }

    /// The owner-claim key of `stream`.
    pub(crate) fn owner_key(stream: &str) -> String {
        format!("{stream}:owner")
    }
}

/// The machine's host name, else `warren`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "warren".to_string())
}

/// How the drainer republishes. Not a config section of its own: the
/// `[spool]` keys `drain-window` and `drain-stall-timeout-ms` set `window`
/// and `stall_timeout_ms` ([`SpoolConfig::drainer`]); the rest are fixed
/// tuning that tests shorten.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainerConfig {
    /// Entries read per `XRANGE`.
    pub batch: usize,
    /// Publishes awaiting their confirm at once, at most: `spool.drain-window`.
    pub window: usize,
    /// Lease time-to-live; renewed every third of it.
    pub lease_ttl_ms: u64,
    /// `spool.drain-stall-timeout-ms`.
    pub stall_timeout_ms: u64,
    /// First pause after a failed pass; its ceiling doubles up to
    /// `backoff_max_ms`, jittered between this and the ceiling.
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
            max_batch: 0,
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
