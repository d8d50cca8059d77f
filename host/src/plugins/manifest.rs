//! What a plugin says about itself, in host terms, and its validation.
//!
//! The guest's `manifest()` answer is converted into [`Manifest`] and checked
//! once at load time; every problem is reported together. This module does
//! not decide limits (see [`super::limits`]) and declares nothing on the
//! broker.

use serde::{Deserialize, Serialize};

use super::bindings as wit;

/// A plugin's description of itself, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub subscriptions: Vec<Subscription>,
    #[serde(default)]
    pub outputs: Outputs,
    pub limits: RequestedLimits,
    /// Origins the plugin calls (what it asks; the operator grants).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// Whether it uses `wasi:keyvalue` state.
    #[serde(default)]
    pub state: bool,
}

/// Where a plugin's outputs go: declared by Warren so they exist before
/// the first output (an existing one is used as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outputs {
    #[serde(default)]
    pub exchanges: Vec<OutputExchange>,
    #[serde(default)]
    pub queues: Vec<OutputQueue>,
}

/// An exchange a plugin publishes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutputExchange {
    pub name: String,
    #[serde(default)]
    pub kind: ExchangeKind,
}

/// A queue a plugin's outputs land in, optionally bound to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutputQueue {
    pub name: String,
    #[serde(default)]
    pub kind: QueueKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<Binding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
}

/// A queue the plugin consumes and how to declare it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Subscription {
    pub queue: String,
    #[serde(default)]
    pub kind: QueueKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<Binding>,
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Effectively-once handling of this subscription's deliveries (set
    /// by the operator's config; a component's manifest cannot ask for it
    /// in contract 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
}

/// `dedup`: a subscription's deliveries keyed, and each key's effects
/// applied once within the window (DESIGN.md §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Dedup {
    /// Where a delivery's key is: `message-id`, `header:<name>` or
    /// `json:<pointer>` (an RFC 6901 pointer into a JSON body, such as
    /// `json:/order/id`).
    pub key: String,
    /// How long a handled key is remembered: a number and `s`, `m`, `h`
    /// or `d` (`90s`, `15m`, `1h`, `7d`).
    #[serde(default = "default_dedup_window")]
    pub window: String,
    /// When the store cannot be reached: `pause` (hold deliveries until
    /// it can; the default) or `at-least-once` (handle them without
    /// deduplication, reported as degraded).
    #[serde(default)]
    pub on_store_down: OnStoreDown,
}

fn default_dedup_window() -> String {
    "1h".into()
}

/// `dedup.on-store-down`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreDown {
    #[default]
    Pause,
    AtLeastOnce,
}

/// Where a delivery's deduplication key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupSource {
    MessageId,
    Header(String),
    JsonPointer(String),
}

impl Dedup {
    /// Where the key is, or why `key` names no place.
    pub fn source(&self) -> Result<DedupSource, String> {
        match self.key.split_once(':') {
            None if self.key == "message-id" => Ok(DedupSource::MessageId),
            Some(("header", name)) if !name.is_empty() => Ok(DedupSource::Header(name.into())),
            Some(("json", p)) if p.is_empty() || p.starts_with('/') => {
                Ok(DedupSource::JsonPointer(p.into()))
            }
            _ => Err(format!(
                "dedup.key {:?} is not `message-id`, `header:<name>` or `json:<pointer starting with />`",
                self.key
            )),
        }
    }

    /// The window as a duration, or why it is not one.
    pub fn window(&self) -> Result<std::time::Duration, String> {
        let w = self.window.trim();
        let bad = || {
            format!(
                "dedup.window {:?} is not a number of seconds, minutes, hours or days, such as `90s`, `15m`, `1h` or `7d`, of at least 1s",
                self.window
            )
        };
        let split = w.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = w[..split].parse().map_err(|_| bad())?;
        let unit = match &w[split..] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        match n.checked_mul(unit) {
            Some(secs) if secs > 0 => Ok(std::time::Duration::from_secs(secs)),
            _ => Err(bad()),
        }
    }

    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        [self.source().err(), self.window().err()]
            .into_iter()
            .flatten()
            .collect()
    }
}

fn default_prefetch() -> u16 {
    DEFAULT_PREFETCH
}

/// Prefetch used when a subscription from config does not name one.
pub const DEFAULT_PREFETCH: u16 = 64;

/// Queue type to declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    #[default]
    Quorum,
    Classic,
}

/// An exchange and the keys to bind a queue with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Binding {
    pub exchange: String,
    #[serde(default)]
    pub kind: ExchangeKind,
    #[serde(default)]
    pub keys: Vec<String>,
}

/// Exchange type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
    #[default]
    Topic,
    Headers,
}

impl ExchangeKind {
    /// The AMQP name of the exchange type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Limits as the plugin asked for them; `None` leaves the host default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RequestedLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_deadline_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
}

/// Longest plugin name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest AMQP short string (queue, exchange, routing key).
pub const MAX_SHORTSTR: usize = 255;

/// Whether `name` is a valid plugin name: 1 to 64 of `[a-z0-9_-]`, starting
/// with a letter or digit. Plugin names become file names and metric labels.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Manifest {
    /// Every problem with this manifest, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !is_valid_name(&self.name) {
            out.push(format!(
                "name {:?} must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, '-' or '_'",
                self.name
            ));
        }
        if self.version.trim().is_empty() || self.version.len() > 64 {
            out.push(format!(
                "version {:?} must be 1 to 64 characters",
                self.version
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.subscriptions {
            out.extend(s.problems());
            if !seen.insert(s.queue.as_str()) {
                out.push(format!("queue {:?} is subscribed twice", s.queue));
            }
        }
        out.extend(self.outputs.problems());
        out.extend(self.limits.problems());
        for o in &self.outbound {
            if let Err(e) = super::outbound::Origin::parse(o) {
                out.push(e);
            }
        }
        out
    }
}

/// Problems with a queue name, described as `what`.
fn queue_name_problems(what: &str, q: &str) -> Option<String> {
    if q.is_empty() || q.len() > MAX_SHORTSTR {
        Some(format!("{what} {q:?} must be 1 to {MAX_SHORTSTR} bytes"))
    } else if q.starts_with("amq.") {
        Some(format!(
            "{what} {q:?}: names starting with 'amq.' are reserved by the broker"
        ))
    } else {
        None
    }
}

/// Problems with an exchange name, described as `what`.
fn exchange_name_problems(what: &str, e: &str) -> Option<String> {
    if e.is_empty() || e.len() > MAX_SHORTSTR {
        Some(format!("{what} {e:?} must be 1 to {MAX_SHORTSTR} bytes"))
    } else if e.starts_with("amq.") {
        Some(format!("{what} {e:?} is reserved by the broker"))
    } else {
        None
    }
}

impl Binding {
    /// Problems with this binding, for the entity `owner` names.
    fn problems(&self, owner: &str) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(exchange_name_problems(
            &format!("{owner}: binding exchange"),
            &self.exchange,
        ));
        if let Some(k) = self.keys.iter().find(|k| k.len() > MAX_SHORTSTR) {
            out.push(format!(
                "{owner}: binding key {k:?} is longer than {MAX_SHORTSTR} bytes"
            ));
        }
        out
    }
}

impl Outputs {
    /// Every problem with these output declarations.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.exchanges {
            out.extend(exchange_name_problems("output exchange", &e.name));
        }
        for q in &self.queues {
            out.extend(queue_name_problems("output queue", &q.name));
            if q.max_length == Some(0) {
                out.push(format!(
                    "output queue {:?}: max-length must be at least 1",
                    q.name
                ));
            }
            if let Some(b) = &q.bind {
                out.extend(b.problems(&format!("output queue {:?}", q.name)));
            }
        }
        out
    }
}

impl Subscription {
    /// Every problem with this subscription.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let q = &self.queue;
        out.extend(queue_name_problems("subscription queue", q));
        if self.prefetch == 0 {
            out.push(format!("subscription {q:?}: prefetch must be at least 1"));
        }
        if self.max_attempts == Some(0) {
            out.push(format!(
                "subscription {q:?}: max-attempts must be at least 1"
            ));
        }
        if self.message_ttl_ms == Some(0) {
            out.push(format!(
                "subscription {q:?}: message-ttl-ms must be at least 1"
            ));
        }
        if let Some(b) = &self.bind {
            out.extend(b.problems(&format!("subscription {q:?}")));
        }
        if let Some(d) = &self.dedup {
            out.extend(
                d.problems()
                    .into_iter()
                    .map(|p| format!("subscription {q:?}: {p}")),
            );
        }
        out
    }
}

impl RequestedLimits {
    /// Every problem with these limits.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = self.memory_bytes
            && m < super::limits::MIN_MEMORY_BYTES
        {
            out.push(format!(
                "limits.memory-bytes {m} is below the minimum of {} (1 MiB)",
                super::limits::MIN_MEMORY_BYTES
            ));
        }
        if self.deadline_ms == Some(0) {
            out.push("limits.deadline-ms must be at least 1".to_string());
        }
        if self.max_concurrency == Some(0) {
            out.push("limits.max-concurrency must be at least 1".to_string());
        }
        if self.wall_deadline_ms == Some(0) {
            out.push("limits.wall-deadline-ms must be at least 1".to_string());
        }
        out
    }
}

impl From<wit::Manifest> for Manifest {
    fn from(m: wit::Manifest) -> Self {
        Self {
            name: m.name,
            version: m.version,
            subscriptions: m.subscriptions.into_iter().map(Into::into).collect(),
            outputs: Outputs {
                exchanges: m
                    .outputs
                    .exchanges
                    .into_iter()
                    .map(|e| OutputExchange {
                        name: e.name,
                        kind: e.kind.into(),
                    })
                    .collect(),
                queues: m
                    .outputs
                    .queues
                    .into_iter()
                    .map(|q| OutputQueue {
                        name: q.name,
                        kind: q.kind.into(),
                        bind: q.bind.map(Into::into),
                        max_length: q.max_length,
                    })
                    .collect(),
            },
            limits: RequestedLimits {
                memory_bytes: m.limits.memory_bytes,
                deadline_ms: m.limits.deadline_ms,
                max_concurrency: m.limits.max_concurrency,
                wall_deadline_ms: m.limits.wall_deadline_ms,
                max_response_bytes: m.limits.max_response_bytes,
            },
            outbound: m.outbound,
            state: m.state,
        }
    }
}

impl From<wit::Subscription> for Subscription {
    fn from(s: wit::Subscription) -> Self {
        Self {
            queue: s.queue,
            kind: s.kind.into(),
            bind: s.bind.map(Into::into),
            prefetch: s.prefetch,
            message_ttl_ms: s.message_ttl_ms,
            max_attempts: s.max_attempts,
            dedup: None,
        }
    }
}

impl From<wit::QueueKind> for QueueKind {
    fn from(k: wit::QueueKind) -> Self {
        match k {
            wit::QueueKind::Quorum => QueueKind::Quorum,
            wit::QueueKind::Classic => QueueKind::Classic,
        }
    }
}

impl From<wit::ExchangeKind> for ExchangeKind {
    fn from(k: wit::ExchangeKind) -> Self {
        match k {
            wit::ExchangeKind::Direct => ExchangeKind::Direct,
            wit::ExchangeKind::Fanout => ExchangeKind::Fanout,
            wit::ExchangeKind::Topic => ExchangeKind::Topic,
            wit::ExchangeKind::Headers => ExchangeKind::Headers,
        }
    }
}

impl From<wit::Binding> for Binding {
    fn from(b: wit::Binding) -> Self {
        Binding {
            exchange: b.exchange,
            kind: b.kind.into(),
            keys: b.keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "orders".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                queue: "orders.in".into(),
                kind: QueueKind::Quorum,
                bind: Some(Binding {
                    exchange: "orders".into(),
                    kind: ExchangeKind::Topic,
                    keys: vec!["orders.#".into()],
                }),
                prefetch: 10,
                message_ttl_ms: None,
                max_attempts: Some(3),
                dedup: None,
            }],
            outputs: Outputs {
                exchanges: vec![OutputExchange {
                    name: "orders.routed".into(),
                    kind: ExchangeKind::Topic,
                }],
                queues: vec![OutputQueue {
                    name: "orders.audit".into(),
                    kind: QueueKind::Quorum,
                    bind: None,
                    max_length: None,
                }],
            },
            limits: RequestedLimits::default(),
            outbound: vec!["https://*.example.com".into()],
            state: false,
        }
    }

    #[test]
    fn valid_manifest_has_no_problems() {
        assert!(manifest().problems().is_empty());
    }

    #[test]
    fn every_problem_is_reported() {
        let mut m = manifest();
        m.name = "Bad Name".into();
        m.version = String::new();
        m.subscriptions[0].prefetch = 0;
        m.subscriptions.push(m.subscriptions[0].clone());
        m.limits.deadline_ms = Some(0);
        m.outputs.exchanges[0].name = "amq.topic".into();
        m.outputs.queues[0].name = String::new();
        let p = m.problems();
        assert!(
            p.iter()
                .any(|s| s.contains("output exchange \"amq.topic\"")),
            "{p:?}"
        );
        assert!(p.iter().any(|s| s.contains("output queue \"\"")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("name \"Bad Name\"")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("version")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("prefetch")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("subscribed twice")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("deadline-ms")), "{p:?}");
    }

    #[test]
    fn names() {
        assert!(is_valid_name("router"));
        assert!(is_valid_name("a-b_2"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("../x"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name(&"a".repeat(65)));
    }
}
