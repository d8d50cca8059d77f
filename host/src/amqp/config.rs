//! `[amqp]`: the broker connection settings a user writes, and the
//! supervisor's [`AmqpConfig`] built from them. The section holds every
//! user-facing default; `AmqpConfig` adds only what is not a setting (the
//! connection's role, the topology dispatch declares, the stop deadline).

use std::time::Duration;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use super::supervisor::AmqpConfig;
use super::topology::Topology;
use crate::backoff::BackoffConfig;
use crate::secret::{redact_url, redacted_url, redacted_urls};

/// `[amqp]`: the broker connection.
#[derive(Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct AmqpSection {
    /// `amqp://` or `amqps://` URL; the password is redacted in logs.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// The nodes of a cluster, each an `amqp://` or `amqps://` URL; when
    /// set it replaces `url`. Each (re)connect tries them in a shuffled
    /// order.
    #[serde(serialize_with = "redacted_urls")]
    pub urls: Vec<String>,
    /// Requested heartbeat, seconds.
    pub heartbeat_secs: u16,
    /// Limit on one connection attempt, ms.
    pub connect_timeout_ms: u64,
    /// Limit on every publisher confirm, ms.
    pub confirm_timeout_ms: u64,
    /// First reconnect delay ceiling, ms.
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay, ms. Delays are fully jittered, so a
    /// fleet that lost the same broker spreads its attempts over all of
    /// it. A session that ran at least this long starts the delays over:
    /// the first attempt after its loss comes within backoff-initial-ms.
    /// A session lost sooner (a flapping broker) lets them grow.
    pub backoff_max_ms: u64,
    /// Largest delay after a connect that every endpoint refused outright
    /// (nothing listening: a broker restarting), ms. Refused connects cost
    /// the broker nothing, so they are retried this often and a broker
    /// that comes back is used within about this long.
    pub refused_retry_ms: u64,
    /// How often consumers compare broker-side consumer counts, ms.
    pub consumer_check_ms: u64,
    /// File holding the broker password (a mounted secret), set into
    /// `url` and every one of `urls` in place of theirs; read at start.
    pub password_file: Option<std::path::PathBuf>,
}

impl Default for AmqpSection {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            urls: Vec::new(),
            heartbeat_secs: 10,
            connect_timeout_ms: 5_000,
            confirm_timeout_ms: 5_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            refused_retry_ms: 250,
            consumer_check_ms: 5_000,
            password_file: None,
        }
    }
}

impl std::fmt::Debug for AmqpSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSection")
            .field("url", &redact_url(&self.url))
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .finish_non_exhaustive()
    }
}

impl AmqpSection {
    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, url) in std::iter::once(("amqp.url", &self.url))
            .chain(self.urls.iter().map(|u| ("amqp.urls", u)))
        {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                out.push(format!(
                    "{key} {:?} must start with amqp:// or amqps://",
                    redact_url(url)
                ));
            }
        }
        if let Err(e) = self.endpoints() {
            out.push(e);
        }
        if self.refused_retry_ms == 0 {
            out.push("amqp.refused-retry-ms must be at least 1".into());
        }
        if self.heartbeat_secs == 0 {
            out.push("amqp.heartbeat-secs must be at least 1".into());
        }
        if self.confirm_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            out.push("amqp timeouts must be at least 1 ms".into());
        }
        if self.backoff_initial_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            out.push(
                "amqp.backoff-initial-ms must be at least 1 and at most backoff-max-ms".into(),
            );
        }
        out
    }

    /// The endpoints: `urls`, else `url`, each with the password of
    /// `password-file` when one is set.
    fn endpoints(&self) -> Result<Vec<String>, String> {
        let urls = if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        };
        let Some(path) = &self.password_file else {
            return Ok(urls);
        };
        let password = crate::secret::read_secret_file("amqp.password-file", path)?;
        urls.iter()
            .map(|u| crate::secret::with_password("amqp.url", u, &password))
            .collect()
    }

    /// The reconnect backoff these settings give.
    pub fn backoff(&self) -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
        }
    }

    /// The section a supervisor runs with, read back from its settings
    /// (the effective configuration `/config` shows).
    pub fn of(c: &AmqpConfig) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            url: c.url.clone(),
            urls: if c.more_urls.is_empty() {
                Vec::new()
            } else {
                std::iter::once(&c.url)
                    .chain(&c.more_urls)
                    .cloned()
                    .collect()
            },
            heartbeat_secs: u16::try_from(c.heartbeat.as_secs()).unwrap_or(u16::MAX),
            connect_timeout_ms: ms(c.connect_timeout),
            confirm_timeout_ms: ms(c.confirm_timeout),
            backoff_initial_ms: ms(c.backoff.initial),
            backoff_max_ms: ms(c.backoff.max),
            refused_retry_ms: ms(c.refused_retry),
            consumer_check_ms: ms(c.consumer_check_interval),
            password_file: None,
        }
    }

    /// The supervisor's settings for connection `role`: these keys, the
    /// first of `urls` (else `url`) as the primary endpoint.
    pub fn supervisor(&self, role: &str) -> AmqpConfig {
        // Validation reports an unreadable password file; here the URLs
        // are then used as written.
        let mut urls = self.endpoints().unwrap_or_else(|_| {
            if self.urls.is_empty() {
                vec![self.url.clone()]
            } else {
                self.urls.clone()
            }
        });
        AmqpConfig {
            url: urls.remove(0),
            more_urls: urls,
            role: role.to_owned(),
            host_name: None,
            heartbeat: Duration::from_secs(self.heartbeat_secs.into()),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            backoff: self.backoff(),
            refused_retry: Duration::from_millis(self.refused_retry_ms),
            watchdog_interval: Duration::from_secs(1),
            consumer_check_interval: Duration::from_millis(self.consumer_check_ms),
            confirm_timeout: Duration::from_millis(self.confirm_timeout_ms),
            // `warren run` sets the grace period (`App::start`).
            drain_timeout: Duration::from_secs(30),
            ack_flush_interval: Duration::from_millis(5),
            topology: Topology::default(),
        }
    }
}
