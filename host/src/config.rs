//! `warren.toml`: one serde tree, every key optional with a working
//! default, environment overrides, and validation that reports every problem
//! at once.
//!
//! This module is a leaf: it is plain data. `main` loads it once and
//! hands each subsystem its section by value; nothing else reads files or
//! the environment for settings.
//!
//! Environment overrides are named `WARREN_<SECTION>_<KEY>` with the key's
//! dashes written as underscores: `WARREN_AMQP_URL`, `WARREN_ADMIN_TOKEN`,
//! `WARREN_PLUGINS_DIR`, `WARREN_SPOOL_SENTINELS` (a TOML array or a
//! comma-separated list).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use crate::plugins::manifest::Subscription;
use crate::plugins::{LimitsOverride, RuntimeConfig};
pub use crate::secret::Secret;

/// Exit code for a configuration error (EX_CONFIG, as `vector validate`
/// and sysexits.h use it).
pub const EXIT_CONFIG: u8 = 78;

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub amqp: AmqpSection,
    pub spool: SpoolSection,
    pub plugins: PluginsSection,
    /// Per-plugin overrides, by manifest name (`[plugin.<name>]`).
    pub plugin: BTreeMap<String, PluginOverride>,
    pub dispatch: DispatchSection,
    pub admin: AdminSection,
    pub telemetry: TelemetrySection,
    pub shutdown: ShutdownSection,
}

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
    /// Largest reconnect delay, ms.
    pub backoff_max_ms: u64,
    /// Largest delay after a connect that every endpoint refused outright
    /// (nothing listening: a broker restarting), ms. Refused connects cost
    /// the broker nothing, so they are retried this often and a broker
    /// that comes back is used within about this long.
    pub refused_retry_ms: u64,
    /// How often consumers compare broker-side consumer counts, ms.
    pub consumer_check_ms: u64,
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

/// `[spool]`: where outputs wait while the broker is down.
#[derive(Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct SpoolSection {
    /// Sentinel addresses (`redis://host:port`). When empty, `url` is used.
    #[serde(serialize_with = "redacted_urls")]
    pub sentinels: Vec<String>,
    /// Sentinel master name.
    pub master_name: String,
    /// A single Redis for development: not highly available.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// This host's id, part of the spool stream key; default: host name.
    pub host_id: Option<String>,
    /// Stream key; default `warren:spool:<host-id>`.
    pub stream_key: Option<String>,
    /// Replicas that must confirm an append (default 1 with sentinels, 0
    /// with a plain URL).
    pub min_replicas: Option<u32>,
    /// `WAIT` timeout, ms.
    pub wait_timeout_ms: u64,
    /// Most entries the spool may hold.
    pub max_entries: u64,
    /// Most payload bytes the spool may hold.
    pub max_bytes: u64,
    /// Spooled messages the drainer keeps awaiting their confirm at once.
    /// 1 keeps strict order even when a republish fails mid-way; larger
    /// windows drain much faster, and a failed republish then comes again
    /// after the ones behind it. Default 1024, the drainer's read batch:
    /// with 256-byte persistent messages the drain then runs at about the
    /// broker's own confirmed-publish rate (`bench --bin spool`), where 256
    /// left it at 11k/s.
    pub drain_window: usize,
    /// How long the drainer waits with publishes in flight and no progress
    /// at all (no send completing, no confirm arriving, the broker not
    /// blocking publishes) before it gives them up and republishes from
    /// the first unconfirmed entry, duplicating whatever the broker had
    /// routed. A broker that dies is noticed sooner, by the heartbeat,
    /// which fails every confirm in flight; this is the last resort for a
    /// confirm that never comes on a live connection. Default 30 s: a
    /// broker stalled a few seconds by its disk is slow, not failed.
    pub drain_stall_timeout_ms: u64,
    /// With entries in the spool and the broker connected, how long the
    /// drain may make no progress before `/ready` and `/status` list it as
    /// stalled (a `degraded` reason, `warren_spool_drain_stalled` = 1).
    pub drain_stalled_after_ms: u64,
    /// ACL user on the data nodes (with `url`, the URL's own user works too).
    pub username: Option<String>,
    /// Password on the data nodes (`requirepass`, or the ACL user's).
    #[serde(serialize_with = "redacted_secret")]
    pub password: Option<Secret>,
    /// File holding the data nodes' password (a mounted secret); instead of
    /// `password`.
    pub password_file: Option<PathBuf>,
    /// ACL user on the sentinels (the sentinel URLs' own user works too).
    pub sentinel_username: Option<String>,
    /// Password on the sentinels (their `requirepass`); the sentinel URLs'
    /// own password works too.
    #[serde(serialize_with = "redacted_secret")]
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
    /// claim for this long.
    pub owner_lease_ms: u64,
    /// Drain the streams of hosts that are gone (their claim expired).
    pub adopt_orphans: bool,
}

impl Default for SpoolSection {
    fn default() -> Self {
        Self {
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            url: "redis://127.0.0.1:6379".into(),
            host_id: None,
            stream_key: None,
            min_replicas: None,
            wait_timeout_ms: 500,
            max_entries: 1_000_000,
            max_bytes: 512 << 20,
            drain_window: crate::buffer::DrainerConfig::default().window,
            drain_stall_timeout_ms: crate::buffer::DrainerConfig::default().stall_timeout_ms,
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
            owner_lease_ms: crate::buffer::SpoolConfig::default().owner_lease_ms,
            adopt_orphans: true,
        }
    }
}

impl std::fmt::Debug for SpoolSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolSection")
            .field(
                "sentinels",
                &self
                    .sentinels
                    .iter()
                    .map(|s| redact_url(s))
                    .collect::<Vec<_>>(),
            )
            .field("master_name", &self.master_name)
            .field("url", &redact_url(&self.url))
            .field("stream_key", &self.stream_key)
            .finish_non_exhaustive()
    }
}

impl SpoolSection {
    /// The addresses in use: the sentinels, or `url` when there are none.
    fn addresses(&self) -> Vec<&String> {
        if self.sentinels.is_empty() {
            vec![&self.url]
        } else {
            self.sentinels.iter().collect()
        }
    }

    /// Problems with the addresses, credentials and TLS settings.
    fn problems(&self) -> Vec<String> {
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
        let min_lease = 3 * crate::buffer::SpoolConfig::default().status_interval_ms;
        if self.owner_lease_ms < min_lease {
            out.push(format!(
                "spool.owner-lease-ms must be at least {min_lease} (it is renewed every {} ms)",
                min_lease / 3
            ));
        }
        out
    }
}

/// `[plugins]`: where plugins come from and the engine settings.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct PluginsSection {
    /// Directory scanned for `*.wasm` components.
    pub dir: PathBuf,
    /// Engine-wide settings (`[plugins.runtime]`).
    pub runtime: RuntimeConfig,
    /// Poll the directory this often, ms, and reload when its `*.wasm`
    /// files changed and then stayed unchanged for one more poll; 0 (the
    /// default) turns watching off. `warren run --watch` sets 1000.
    pub watch_ms: u64,
}

impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./plugins"),
            runtime: RuntimeConfig::default(),
            watch_ms: 0,
        }
    }
}

/// `[plugin.<name>]`: host-side settings of one plugin; each wins over the
/// plugin's manifest.
#[derive(Debug, Clone, Default, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct PluginOverride {
    /// Limits overrides.
    pub limits: LimitsOverride,
    /// Values for the plugin's `config(key)` import. Numbers and booleans
    /// are passed as their text.
    pub config: BTreeMap<String, toml::Value>,
    /// Replaces the manifest's subscriptions when present.
    pub subscriptions: Option<Vec<Subscription>>,
    /// `fresh` (default): a new instance per delivery; `reuse`: instances
    /// serve deliveries one at a time, up to `reuse-max-deliveries` each,
    /// and are dropped after any trap (see `plugins::InstancePolicy`).
    pub instance: InstanceSetting,
    /// Deliveries one reused instance serves before it is replaced
    /// (default 1000).
    pub reuse_max_deliveries: Option<u32>,
}

/// `[plugin.<name>] instance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceSetting {
    #[default]
    Fresh,
    Reuse,
}

impl PluginOverride {
    /// The instance policy these settings ask for.
    pub fn instance_policy(&self) -> crate::plugins::InstancePolicy {
        match self.instance {
            InstanceSetting::Fresh => crate::plugins::InstancePolicy::Fresh,
            InstanceSetting::Reuse => crate::plugins::InstancePolicy::Reuse {
                max_deliveries: self.reuse_max_deliveries.unwrap_or(1000),
            },
        }
    }
}

impl PluginOverride {
    /// `config` as strings, the form the plugin sees.
    pub fn config_strings(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    }
}

/// `[dispatch]`: what happens to each outcome.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct DispatchSection {
    /// Attempts before a message is dead-lettered (a subscription's
    /// `max-attempts` wins).
    pub max_attempts: u32,
    /// Delay before the first retry, ms; doubles per attempt.
    pub retry_delay_ms: u64,
    /// Longest retry delay, ms.
    pub retry_delay_max_ms: u64,
    /// Exchange (and queue prefix) Warren declares for delayed retries.
    pub retry_exchange: String,
    /// Dead-letter exchange Warren declares.
    pub dead_letter_exchange: String,
    /// Dead-letter queue bound to it.
    pub dead_letter_queue: String,
    /// `x-delivery-limit` of the quorum queues Warren declares: a message
    /// returned to its queue this many times (a channel closed while it was
    /// unacknowledged, a consumer timeout, a host killed mid-delivery) is
    /// dead-lettered by the broker into `dead-letter-queue`. RabbitMQ 4
    /// applies 20 when a queue sets none, and drops such a message when
    /// the queue has no dead-letter exchange; Warren sets both.
    pub delivery_limit: u32,
    /// The broker's consumer timeout, ms (RabbitMQ's `consumer_timeout`,
    /// 30 min unless the broker or a queue's `x-consumer-timeout` says
    /// otherwise). A route whose plugin deadline is longer is warned about
    /// at start: the broker would take each such delivery back mid-handle.
    pub broker_consumer_timeout_ms: u64,
}

impl Default for DispatchSection {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            retry_delay_ms: 1_000,
            retry_delay_max_ms: 60_000,
            retry_exchange: "warren.retry".into(),
            dead_letter_exchange: "warren.dlx".into(),
            dead_letter_queue: "warren.dlq".into(),
            delivery_limit: 20,
            broker_consumer_timeout_ms: 1_800_000,
        }
    }
}

/// `[admin]`: the admin HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct AdminSection {
    /// Listen address.
    pub bind: String,
    /// Bearer token required by the mutating endpoints (reload, upload,
    /// delete, publish). Without one they are open on a loopback `bind`
    /// and answer 403 on any other; probes, status and metrics never need
    /// it.
    #[serde(serialize_with = "redacted_secret")]
    pub token: Option<Secret>,
    /// Largest request body (plugin uploads), bytes.
    pub max_body_bytes: usize,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9090".into(),
            token: None,
            max_body_bytes: 32 << 20,
        }
    }
}

/// `[telemetry]`: logs and trace export.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct TelemetrySection {
    /// `text` or `json`.
    pub log_format: crate::telemetry::LogFormat,
    /// Filter when `RUST_LOG` is unset, e.g. `info` or `warren=debug`.
    pub log_level: String,
    /// OTLP/HTTP (protobuf) traces endpoint, e.g.
    /// `http://127.0.0.1:4318/v1/traces`: each delivery's span is exported
    /// there. Off when unset (the default); plain `http://` only.
    #[serde(serialize_with = "redacted_opt_url")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces exported; a delivery whose `traceparent`
    /// says sampled (or not) follows its parent.
    pub otlp_sample_ratio: f64,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            log_format: crate::telemetry::LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_sample_ratio: 1.0,
        }
    }
}

/// `[shutdown]`: stopping.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct ShutdownSection {
    /// How long in-flight deliveries may take to finish after SIGTERM, ms.
    pub grace_period_ms: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            grace_period_ms: 30_000,
        }
    }
}

// Serializers for `warren config`: what it prints never holds a secret.
// (An unset secret is skipped as every `None` is; see `config_doc`.)

fn redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

fn redacted_urls<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

fn redacted_opt_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redact_url(u)),
        None => s.serialize_none(),
    }
}

fn redacted_secret<S: Serializer>(secret: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// `scheme://user:password@host/...` with the password replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:<redacted>@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration{}:\n  - {}", source_name(.source_path), .problems.join("\n  - "))]
pub struct ConfigError {
    pub source_path: Option<PathBuf>,
    pub problems: Vec<String>,
}

fn source_name(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

const SECTIONS: &[&str] = &[
    "amqp",
    "spool",
    "plugins",
    "plugin",
    "dispatch",
    "admin",
    "telemetry",
    "shutdown",
];

impl Config {
    /// Load `path` (or only defaults when `None`), apply `env` overrides
    /// (`WARREN_*` pairs), and validate.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_path: path.map(Path::to_path_buf),
            problems,
        };
        match Self::load_checked(path, env) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(fail(problems)),
        }
    }

    /// Like [`Config::load`], but returns what could be read alongside
    /// every problem: a key that does not parse is reported and left at
    /// its default, so the rest is still read and checked. `None` when the
    /// file cannot be read or is not TOML.
    pub fn load_checked(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<Config>, Vec<String>) {
        let text = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) => return (None, vec![format!("cannot read {}: {e}", p.display())]),
            },
            None => String::new(),
        };
        Self::parse_checked(&text, env)
    }

    /// Parse TOML text with env overrides; every problem in the error.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        match Self::parse_checked(text, env) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(problems),
        }
    }

    /// [`Config::parse`] returning the configuration read so far with the
    /// problems (see [`Config::load_checked`]).
    pub fn parse_checked(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<Config>, Vec<String>) {
        let mut problems = Vec::new();
        let mut root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => return (None, vec![format!("not valid TOML: {e}")]),
        };
        apply_env(&mut root, env, &mut problems);
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(format!(
                    "unknown section [{key}] (known: {})",
                    SECTIONS.join(", ")
                ));
            }
        }
        let mut cfg = Config {
            amqp: section(&root, "amqp", &mut problems),
            spool: section(&root, "spool", &mut problems),
            plugins: section(&root, "plugins", &mut problems),
            plugin: BTreeMap::new(),
            dispatch: section(&root, "dispatch", &mut problems),
            admin: section(&root, "admin", &mut problems),
            telemetry: section(&root, "telemetry", &mut problems),
            shutdown: section(&root, "shutdown", &mut problems),
        };
        match root.get("plugin") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let what = format!("plugin.{name}");
                    match v {
                        toml::Value::Table(t) => {
                            let o = lenient::<PluginOverride>(t, &what, &mut problems);
                            cfg.plugin.insert(name.clone(), o);
                        }
                        _ => problems.push(format!("[{what}] must be a table")),
                    }
                }
            }
            Some(_) => problems.push("[plugin] must be a table of [plugin.<name>] tables".into()),
        }
        problems.extend(cfg.problems());
        (Some(cfg), problems)
    }

    /// Semantic problems (values of the right type but wrong).
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, url) in std::iter::once(("amqp.url", &self.amqp.url))
            .chain(self.amqp.urls.iter().map(|u| ("amqp.urls", u)))
        {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                out.push(format!(
                    "{key} {:?} must start with amqp:// or amqps://",
                    redact_url(url)
                ));
            }
        }
        if self.amqp.refused_retry_ms == 0 {
            out.push("amqp.refused-retry-ms must be at least 1".into());
        }
        if self.amqp.heartbeat_secs == 0 {
            out.push("amqp.heartbeat-secs must be at least 1".into());
        }
        if self.amqp.confirm_timeout_ms == 0 || self.amqp.connect_timeout_ms == 0 {
            out.push("amqp timeouts must be at least 1 ms".into());
        }
        if self.amqp.backoff_initial_ms == 0
            || self.amqp.backoff_initial_ms > self.amqp.backoff_max_ms
        {
            out.push(
                "amqp.backoff-initial-ms must be at least 1 and at most backoff-max-ms".into(),
            );
        }
        out.extend(self.spool.problems());
        if self.spool.max_entries == 0 || self.spool.max_bytes == 0 {
            out.push("spool.max-entries and spool.max-bytes must be at least 1".into());
        }
        if self.spool.drain_window == 0 {
            out.push("spool.drain-window must be at least 1".into());
        }
        if self.spool.drain_stall_timeout_ms == 0 {
            out.push("spool.drain-stall-timeout-ms must be at least 1".into());
        }
        if self.spool.drain_stalled_after_ms == 0 {
            out.push("spool.drain-stalled-after-ms must be at least 1".into());
        }
        if self.spool.wait_timeout_ms == 0 {
            out.push("spool.wait-timeout-ms must be at least 1".into());
        }
        out.extend(self.plugins.runtime.problems());
        for (name, o) in &self.plugin {
            if !crate::plugins::manifest::is_valid_name(name) {
                out.push(format!(
                    "[plugin.{name}]: {name:?} is not a valid plugin name"
                ));
            }
            if o.reuse_max_deliveries == Some(0) {
                out.push(format!(
                    "plugin.{name}.reuse-max-deliveries must be at least 1"
                ));
            }
            if let Some(subs) = &o.subscriptions {
                for s in subs {
                    out.extend(
                        s.problems()
                            .into_iter()
                            .map(|p| format!("plugin.{name}: {p}")),
                    );
                }
            }
        }
        if self.dispatch.max_attempts == 0 {
            out.push("dispatch.max-attempts must be at least 1".into());
        }
        if self.dispatch.delivery_limit == 0 {
            out.push("dispatch.delivery-limit must be at least 1".into());
        }
        if self.dispatch.retry_delay_ms > self.dispatch.retry_delay_max_ms {
            out.push("dispatch.retry-delay-ms exceeds retry-delay-max-ms".into());
        }
        for (key, name) in [
            ("retry-exchange", &self.dispatch.retry_exchange),
            ("dead-letter-exchange", &self.dispatch.dead_letter_exchange),
            ("dead-letter-queue", &self.dispatch.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                out.push(format!(
                    "dispatch.{key} {name:?} must be 1 to 255 bytes and not start with 'amq.'"
                ));
            }
        }
        if self.admin.bind.parse::<SocketAddr>().is_err() {
            out.push(format!(
                "admin.bind {:?} is not an address like 127.0.0.1:9090",
                self.admin.bind
            ));
        }
        if self
            .admin
            .token
            .as_ref()
            .is_some_and(|t| t.expose().len() < 16)
        {
            out.push("admin.token must be at least 16 characters".into());
        }
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !e.starts_with("http://")
        {
            out.push(format!(
                "telemetry.otlp-endpoint {:?} must start with http://",
                redact_url(e)
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.otlp_sample_ratio) {
            out.push("telemetry.otlp-sample-ratio must be between 0 and 1".into());
        }
        if self.shutdown.grace_period_ms == 0 {
            out.push("shutdown.grace-period-ms must be at least 1".into());
        }
        out
    }

    /// The admin listen address (validated by `load`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.bind.parse().ok()
    }
}

/// Deserialize section `name` (absent: defaults), collecting type errors
/// and unknown keys.
fn section<T: DeserializeOwned + Default>(
    root: &toml::Table,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    match root.get(name) {
        None => T::default(),
        Some(toml::Value::Table(t)) => lenient(t, name, problems),
        Some(_) => {
            problems.push(format!("[{name}] must be a table"));
            T::default()
        }
    }
}

/// Deserialize `table` (the keys of `what`) key by key: a key whose value
/// does not fit is reported and left at its default, so one type error
/// does not hide the problems of the other keys (nor the semantic checks
/// of their values). Unknown keys are reported too.
fn lenient<T: DeserializeOwned + Default>(
    table: &toml::Table,
    what: &str,
    problems: &mut Vec<String>,
) -> T {
    let mut good = toml::Table::new();
    for (key, v) in table {
        let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())]));
        let mut unknown = Vec::new();
        let result: Result<T, _> =
            serde_ignored::deserialize(one, |path| unknown.push(path.to_string()));
        for path in unknown {
            problems.push(format!("unknown key {what}.{path}"));
        }
        match result {
            Ok(_) => {
                good.insert(key.clone(), v.clone());
            }
            // The first line: the rest repeats the key the prefix names.
            Err(e) => problems.push(format!(
                "{what}.{key}: {}",
                e.to_string().lines().next().unwrap_or_default().trim()
            )),
        }
    }
    match T::deserialize(toml::Value::Table(good)) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("{what}: {}", e.to_string().trim()));
            T::default()
        }
    }
}

/// Apply `WARREN_<SECTION>_<KEY>=value` pairs. A value is parsed as a TOML
/// value when it is one (number, boolean, array), else taken as a string;
/// `WARREN_SPOOL_SENTINELS` and `WARREN_AMQP_URLS` also accept a
/// comma-separated list.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("WARREN_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS
            .iter()
            .filter(|s| **s != "plugin")
            .find_map(|s| lower.strip_prefix(&format!("{s}_")).map(|k| (*s, k)))
        else {
            problems.push(format!(
                "environment variable {name}: unknown section (use WARREN_<SECTION>_<KEY>)"
            ));
            continue;
        };
        let key = key.replace('_', "-");
        let value = parse_env_value(&key, &raw);
        let table = root
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table {
            toml::Value::Table(t) => {
                t.insert(key, value);
            }
            _ => problems.push(format!("[{section}] must be a table")),
        }
    }
}

fn parse_env_value(key: &str, raw: &str) -> toml::Value {
    if (key == "sentinels" || key == "urls") && !raw.trim_start().starts_with('[') {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        );
    }
    // A scalar like `5000`, `true` or `["a"]` parses as TOML; text does not.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// The `WARREN_*` variables of this process.
pub fn warren_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("WARREN_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text, Vec::new())
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.plugins.dir, PathBuf::from("./plugins"));
        assert_eq!(c.admin.bind, "127.0.0.1:9090");
        assert!(c.spool.sentinels.is_empty());
        assert_eq!(c.spool.url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let text = r#"
            [amqp]
            url = "http://broker"
            heartbeat-secs = "ten"
            [spool]
            sentinals = ["redis://x:1"]
            [dispatch]
            max-attempts = 0
            [admin]
            bind = "nowhere"
            [bogus]
            x = 1
        "#;
        let p = parse(text).unwrap_err();
        let all = p.join("\n");
        assert!(all.contains("amqp:"), "type error in [amqp]: {all}");
        assert!(all.contains("unknown key spool.sentinals"), "{all}");
        assert!(all.contains("dispatch.max-attempts"), "{all}");
        assert!(all.contains("admin.bind \"nowhere\""), "{all}");
        assert!(all.contains("unknown section [bogus]"), "{all}");
        assert!(p.len() >= 5, "{all}");
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let env = vec![
            (
                "WARREN_AMQP_URL".to_string(),
                "amqp://u:p@h:5673/v".to_string(),
            ),
            ("WARREN_ADMIN_BIND".to_string(), "0.0.0.0:9999".to_string()),
            (
                "WARREN_ADMIN_TOKEN".to_string(),
                "0123456789abcdef-token".to_string(),
            ),
            ("WARREN_AMQP_HEARTBEAT_SECS".to_string(), "3".to_string()),
            (
                "WARREN_SPOOL_SENTINELS".to_string(),
                "redis://a:1, redis://b:2".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::parse("[amqp]\nurl = \"amqp://x\"\n", env).unwrap();
        assert_eq!(c.amqp.url, "amqp://u:p@h:5673/v");
        assert_eq!(c.amqp.heartbeat_secs, 3);
        assert_eq!(c.admin.bind, "0.0.0.0:9999");
        assert_eq!(c.spool.sentinels, vec!["redis://a:1", "redis://b:2"]);
    }

    #[test]
    fn unknown_env_section_is_a_problem() {
        let env = vec![("WARREN_NOPE_X".to_string(), "1".to_string())];
        let p = Config::parse("", env).unwrap_err();
        assert!(p[0].contains("WARREN_NOPE_X"), "{p:?}");
    }

    #[test]
    fn spool_security_mistakes_are_reported_together() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let all = parse(&format!(
            r#"
            [spool]
            sentinels = ["rediss://a:1", "redis://b:2"]
            password = "inline"
            password-file = "{pw}"
            sentinel-password-file = "/nonexistent/sentinel-pw"
            tls-cert-file = "{pw}"
            owner-lease-ms = 100
            "#,
            pw = pw.display()
        ))
        .unwrap_err()
        .join("\n");
        for want in [
            "spool addresses mix redis:// and rediss://",
            "set spool.password or spool.password-file, not both",
            "cannot read spool.sentinel-password-file /nonexistent/sentinel-pw",
            "spool.tls-cert-file and spool.tls-key-file go together",
            "spool.owner-lease-ms must be at least 3000",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("inline") && !all.contains("s3cret"), "{all}");
        let plain_tls = parse(
            r#"
            [spool]
            tls-ca-file = "/etc/hostname"
            "#,
        )
        .unwrap_err()
        .join("\n");
        assert!(
            plain_tls.contains("write rediss:// to turn TLS on"),
            "{plain_tls}"
        );
        let env = vec![(
            "WARREN_SPOOL_PASSWORD_FILE".to_owned(),
            pw.display().to_string(),
        )];
        let c = Config::parse("[spool]\nurl = \"redis://:x@127.0.0.1:6379\"", env).unwrap();
        assert_eq!(c.spool.password_file.as_deref(), Some(pw.as_path()));
    }

    #[test]
    fn instance_policy_is_set_per_plugin() {
        let c = parse(
            r#"
            [plugin.py-router]
            instance = "reuse"
            reuse-max-deliveries = 50
            [plugin.echo]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.plugin["py-router"].instance_policy(),
            crate::plugins::InstancePolicy::Reuse { max_deliveries: 50 }
        );
        assert_eq!(
            c.plugin["echo"].instance_policy(),
            crate::plugins::InstancePolicy::Fresh
        );
        let all = parse("[plugin.x]\ninstance = \"sometimes\"\nreuse-max-deliveries = 0\n")
            .unwrap_err()
            .join("\n");
        assert!(all.contains("sometimes"), "{all}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let env = vec![
            (
                "WARREN_AMQP_URL".to_string(),
                "amqp://user:hunter2@h/v".to_string(),
            ),
            (
                "WARREN_ADMIN_TOKEN".to_string(),
                "supersecrettoken1234".to_string(),
            ),
        ];
        let c = Config::parse("", env).unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("supersecrettoken1234"), "{text}");
        assert!(text.contains("user:<redacted>@h/v"), "{text}");
    }

    #[test]
    fn plugin_overrides_parse_with_config_values_as_text() {
        let c = parse(
            r#"
            [plugin.echo]
            limits = { deadline-ms = 250 }
            config = { routing-key = "out", count = 3, loud = true }
            subscriptions = [ { queue = "echo.custom", prefetch = 5 } ]
        "#,
        )
        .unwrap();
        let o = &c.plugin["echo"];
        assert_eq!(o.limits.deadline_ms, Some(250));
        let cfg = o.config_strings();
        assert_eq!(cfg["routing-key"], "out");
        assert_eq!(cfg["count"], "3");
        assert_eq!(cfg["loud"], "true");
        let subs = o.subscriptions.as_ref().unwrap();
        assert_eq!(subs[0].queue, "echo.custom");
        assert_eq!(subs[0].prefetch, 5);
    }

    #[test]
    fn redact_url_keeps_everything_but_the_password() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:<redacted>@h:1/v");
        assert_eq!(redact_url("amqp://h:1/v"), "amqp://h:1/v");
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:<redacted>@h:1");
    }
}
