//! The Warren plugin SDK: a thin layer over `wit-bindgen` for the
//! `warren:plugin@0.2.0` world (`wit/plugin.wit`).
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2` with one `impl`
//! and one macro call:
//!
//! ```ignore
//! use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};
//!
//! struct Echo;
//!
//! impl Plugin for Echo {
//!     fn manifest() -> Manifest {
//!         Manifest::new("echo", "1.0.0").subscribe(Subscription::queue("echo.in"))
//!     }
//!     fn handle(d: Delivery) -> Result<(), HandleError> {
//!         warren_sdk::publish(Message::new("", "echo.out", d.body))?;
//!         Ok(())
//!     }
//! }
//!
//! warren_sdk::export_plugin!(Echo);
//! ```
//!
//! Warren instantiates the plugin afresh for every delivery: statics do not
//! survive between calls. Messages passed to [`publish`] are sent only if
//! `handle` returns `Ok`, and the delivery is acknowledged once they are
//! safe. Return [`HandleError::Retry`] for transient failures and
//! [`HandleError::Reject`] to dead-letter the message. A panic is a trap:
//! the delivery is dead-lettered with the panic message.

// Lets the generated code name this crate the same way from inside and
// from the plugin crates that expand `export_plugin!`.
extern crate self as warren_sdk;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::warren_sdk::bindings",
        runtime_path: "::warren_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::exports::warren::plugin::handler::Guest as Plugin;
pub use bindings::warren::plugin::types::{
    Binding, Delivery, ExchangeKind, HandleError, Header, HeaderValue, Limits, LogLevel, Manifest,
    Message, OutputExchange, OutputQueue, Outputs, PublishError, QueueKind, Subscription,
};

/// Export `$t` (a type implementing [`Plugin`]) as the component's handler.
#[macro_export]
macro_rules! export_plugin {
    ($($t:tt)+) => {
        $crate::bindings::__export_plugin_world!($($t)+ with_types_in $crate::bindings);
    };
}

/// Queue `msg` for publishing once `handle` returns `Ok`.
pub fn publish(msg: Message) -> Result<(), PublishError> {
    bindings::warren::plugin::host::publish(&msg)
}

/// A per-plugin setting from the host's `warren.toml`.
pub fn config(key: &str) -> Option<String> {
    bindings::warren::plugin::host::config(key)
}

/// Log through the host; lines carry the plugin's name and version.
pub mod log {
    use super::LogLevel;
    use super::bindings::warren::plugin::host;

    pub fn debug(text: &str) {
        host::log(LogLevel::Debug, text);
    }
    pub fn info(text: &str) {
        host::log(LogLevel::Info, text);
    }
    pub fn warn(text: &str) {
        host::log(LogLevel::Warn, text);
    }
    pub fn error(text: &str) {
        host::log(LogLevel::Error, text);
    }
}

impl Manifest {
    /// A manifest with no subscriptions, no declared outputs and default
    /// limits.
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
            subscriptions: Vec::new(),
            outputs: Outputs {
                exchanges: Vec::new(),
                queues: Vec::new(),
            },
            limits: Limits {
                memory_bytes: None,
                deadline_ms: None,
                max_concurrency: None,
            },
        }
    }

    /// Add a subscription.
    pub fn subscribe(mut self, s: Subscription) -> Self {
        self.subscriptions.push(s);
        self
    }

    /// Declare exchange `name` (durable, of `kind`) as a destination of
    /// this plugin's outputs: Warren declares it on every (re)connect, so
    /// the first output finds it. An existing exchange is used as it is.
    pub fn output_exchange(mut self, name: &str, kind: ExchangeKind) -> Self {
        self.outputs.exchanges.push(OutputExchange {
            name: name.to_string(),
            kind,
        });
        self
    }

    /// Declare quorum queue `name` as a destination of this plugin's
    /// outputs (published to through the default exchange, routing key =
    /// `name`). An existing queue is used as it is.
    pub fn output_queue(mut self, name: &str) -> Self {
        self.outputs.queues.push(OutputQueue {
            name: name.to_string(),
            kind: QueueKind::Quorum,
            bind: None,
            max_length: None,
        });
        self
    }

    /// Declare queue `q` as a destination of this plugin's outputs, with
    /// everything [`OutputQueue`] can say (a binding, a length limit).
    pub fn output(mut self, q: OutputQueue) -> Self {
        self.outputs.queues.push(q);
        self
    }

    /// Ask for a deadline per delivery.
    pub fn deadline_ms(mut self, ms: u32) -> Self {
        self.limits.deadline_ms = Some(ms);
        self
    }

    /// Ask for a memory limit.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.limits.memory_bytes = Some(bytes);
        self
    }

    /// Ask for a concurrency limit.
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.limits.max_concurrency = Some(n);
        self
    }
}

impl Subscription {
    /// Consume quorum queue `name` with prefetch 64 and the host's attempt
    /// limit.
    pub fn queue(name: &str) -> Self {
        Self {
            queue: name.to_string(),
            kind: QueueKind::Quorum,
            bind: None,
            prefetch: 64,
            message_ttl_ms: None,
            max_attempts: None,
        }
    }

    /// Bind the queue to `exchange` (declared with `kind`) with `keys`.
    pub fn bind(mut self, exchange: &str, kind: ExchangeKind, keys: &[&str]) -> Self {
        self.bind = Some(Binding {
            exchange: exchange.to_string(),
            kind,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        });
        self
    }

    /// Declare a classic queue instead of a quorum queue.
    pub fn classic(mut self) -> Self {
        self.kind = QueueKind::Classic;
        self
    }

    /// Set the prefetch.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// Dead-letter after `n` attempts (1 = never retry).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

impl OutputQueue {
    /// Classic queue `name` bound to `exchange` (declared with `kind`) with
    /// `keys`, keeping at most `max_length` messages (the oldest are
    /// dropped past it): a catch-all for outputs nobody may read.
    pub fn bounded_catch_all(
        name: &str,
        exchange: &str,
        kind: ExchangeKind,
        keys: &[&str],
        max_length: u32,
    ) -> Self {
        OutputQueue {
            name: name.to_string(),
            kind: QueueKind::Classic,
            bind: Some(Binding {
                exchange: exchange.to_string(),
                kind,
                keys: keys.iter().map(|k| k.to_string()).collect(),
            }),
            max_length: Some(max_length),
        }
    }
}

impl Message {
    /// A message for `exchange` with `routing_key` and `body`.
    pub fn new(exchange: &str, routing_key: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.into(),
            content_type: None,
            correlation_id: None,
            message_id: None,
            headers: Vec::new(),
        }
    }

    /// Add a text header.
    pub fn header(mut self, key: &str, value: &str) -> Self {
        self.headers.push(Header {
            key: key.to_string(),
            value: HeaderValue::Text(value.to_string()),
        });
        self
    }
}

impl Delivery {
    /// The value of header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&HeaderValue> {
        self.headers.iter().find(|h| h.key == key).map(|h| &h.value)
    }
}

impl HandleError {
    /// Dead-letter the delivery, with `reason`.
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        HandleError::Reject(reason.to_string())
    }

    /// Deliver again later, with `reason`.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        HandleError::Retry(reason.to_string())
    }
}

/// A message the host would not take is a permanent failure of this
/// delivery: `?` on [`publish`] rejects it.
impl From<PublishError> for HandleError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::LimitExceeded(why) => {
                HandleError::Reject(format!("publish refused: {why}"))
            }
            PublishError::Invalid(why) => HandleError::Reject(format!("invalid output: {why}")),
        }
    }
}
