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
    pub limits: RequestedLimits,
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
        out.extend(self.limits.problems());
        out
    }
}

impl Subscription {
    /// Every problem with this subscription.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let q = &self.queue;
        if q.is_empty() || q.len() > MAX_SHORTSTR {
            out.push(format!(
                "subscription queue {q:?} must be 1 to {MAX_SHORTSTR} bytes"
            ));
        } else if q.starts_with("amq.") {
            out.push(format!(
                "subscription queue {q:?}: names starting with 'amq.' are reserved by the broker"
            ));
        }
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
            if b.exchange.is_empty() || b.exchange.len() > MAX_SHORTSTR {
                out.push(format!(
                    "subscription {q:?}: binding exchange {:?} must be 1 to {MAX_SHORTSTR} bytes",
                    b.exchange
                ));
            } else if b.exchange.starts_with("amq.") {
                out.push(format!(
                    "subscription {q:?}: exchange {:?} is reserved by the broker",
                    b.exchange
                ));
            }
            if let Some(k) = b.keys.iter().find(|k| k.len() > MAX_SHORTSTR) {
                out.push(format!(
                    "subscription {q:?}: binding key {k:?} is longer than {MAX_SHORTSTR} bytes"
                ));
            }
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
        out
    }
}

impl From<wit::Manifest> for Manifest {
    fn from(m: wit::Manifest) -> Self {
        Self {
            name: m.name,
            version: m.version,
            subscriptions: m.subscriptions.into_iter().map(Into::into).collect(),
            limits: RequestedLimits {
                memory_bytes: m.limits.memory_bytes,
                deadline_ms: m.limits.deadline_ms,
                max_concurrency: m.limits.max_concurrency,
            },
        }
    }
}

impl From<wit::Subscription> for Subscription {
    fn from(s: wit::Subscription) -> Self {
        Self {
            queue: s.queue,
            kind: match s.kind {
                wit::QueueKind::Quorum => QueueKind::Quorum,
                wit::QueueKind::Classic => QueueKind::Classic,
            },
            bind: s.bind.map(|b| Binding {
                exchange: b.exchange,
                kind: match b.kind {
                    wit::ExchangeKind::Direct => ExchangeKind::Direct,
                    wit::ExchangeKind::Fanout => ExchangeKind::Fanout,
                    wit::ExchangeKind::Topic => ExchangeKind::Topic,
                    wit::ExchangeKind::Headers => ExchangeKind::Headers,
                },
                keys: b.keys,
            }),
            prefetch: s.prefetch,
            message_ttl_ms: s.message_ttl_ms,
            max_attempts: s.max_attempts,
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
            }],
            limits: RequestedLimits::default(),
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
        let p = m.problems();
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
