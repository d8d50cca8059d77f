//! The Warren plugin SDK: a thin layer over `wit-bindgen` for the
//! `warren:plugin@0.3.0` world (`wit/plugin.wit`).
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
//!         warren_sdk::publish(Message::forward(&d, "", "echo.out"))?;
//!         Ok(())
//!     }
//! }
//!
//! warren_sdk::export_plugin!(Echo);
//! ```
//!
//! A [`Delivery`] carries every AMQP basic property and header
//! (`d.properties`; nested tables and arrays are flattened into the header
//! list, each member naming its parent); [`Message::forward`] republishes a
//! delivery with all of them, byte for byte.
//!
//! Warren instantiates the plugin afresh for every delivery: statics do not
//! survive between calls, unless the operator sets `instance = "reuse"`
//! for the plugin, when one instance serves several deliveries in turn and
//! statics do survive until it is dropped (after a set number of
//! deliveries, or any trap; see `wit/plugin.wit`). Messages passed to [`publish`] are sent only if
//! `handle` returns `Ok`, and the delivery is acknowledged once they are
//! safe. Return [`HandleError::Retry`] for transient failures and
//! [`HandleError::Reject`] to dead-letter the message. A panic is a trap:
//! the delivery is dead-lettered with the panic message.
//!
//! State that must outlive a delivery goes in the plugin's key-value
//! bucket ([`kv`]: `get`, `set`, `delete`, `increment`, JSON values; the
//! manifest says [`Manifest::state`]). Its writes are part of the delivery:
//! they reach the store only if `handle` returns `Ok`, and `?` on a [`kv`]
//! call retries the delivery when the store is unreachable and rejects it
//! for a refused key or value.

// Lets the generated code name this crate the same way from inside and
// from the plugin crates that expand `export_plugin!`.
extern crate self as warren_sdk;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        // A link to the repository's `wit/`; `warren new` writes the file itself.
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::warren_sdk::bindings",
        runtime_path: "::warren_sdk::__wit_bindgen::rt",
        // Compare deliveries, properties and headers in plugins and tests.
        additional_derives: [PartialEq],
        // It holds a resource, which has no equality.
        additional_derives_ignore: ["stream-error"],
        // The standard WASI interfaces of the world (`wasi:http`,
        // `wasi:config`, `wasi:keyvalue`) get bindings of their own.
        generate_all,
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::exports::warren::plugin::handler::Guest as Plugin;
pub use bindings::warren::plugin::types::{
    Binding, Decimal, DelayedRetry, Delivery, DeliveryMode, ExchangeKind, HandleError, Header,
    HeaderValue, Limits, LogLevel, Manifest, Message, OutputExchange, OutputQueue, Outputs,
    Properties, PublishError, QueueKind, Subscription,
};

pub mod http;
pub mod kv;

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

/// A per-plugin setting or secret through the standard
/// `wasi:config/store` (the same values as [`config`]; a value the
/// operator gives as `{ file = ".." }` or `{ env = ".." }` arrives here
/// like any other). `Err` when the store could not be read.
pub fn secret(key: &str) -> Result<Option<String>, String> {
    bindings::wasi::config::store::get(key).map_err(|e| format!("{e:?}"))
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
                wall_deadline_ms: None,
                max_response_bytes: None,
            },
            outbound: Vec::new(),
            state: false,
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

    /// Ask to call `origin` (`https://api.example.com`,
    /// `http://inventory:8080`, `https://*.example.com` for subdomains).
    /// The operator's config decides what is granted.
    pub fn outbound(mut self, origin: &str) -> Self {
        self.outbound.push(origin.to_string());
        self
    }

    /// Ask for a wall-clock budget of `ms` for all outbound calls of one
    /// delivery; past it the delivery is retried.
    pub fn wall_deadline_ms(mut self, ms: u32) -> Self {
        self.limits.wall_deadline_ms = Some(ms);
        self
    }

    /// Ask for a concurrency limit.
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.limits.max_concurrency = Some(n);
        self
    }

    /// Say the plugin uses key-value state ([`kv`] or `wasi:keyvalue`).
    pub fn state(mut self) -> Self {
        self.state = true;
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

impl Default for Properties {
    /// No property set and no headers (published persistent).
    fn default() -> Self {
        Properties {
            content_type: None,
            content_encoding: None,
            headers: Vec::new(),
            delivery_mode: None,
            priority: None,
            correlation_id: None,
            reply_to: None,
            expiration: None,
            message_id: None,
            timestamp: None,
            message_type: None,
            user_id: None,
            app_id: None,
        }
    }
}

impl Properties {
    /// The top-level header `key` (not a member of a nested table).
    pub fn header(&self, key: &str) -> Option<&HeaderValue> {
        self.headers
            .iter()
            .find(|h| h.parent == 0 && h.key == key)
            .map(|h| &h.value)
    }

    /// Set the top-level header `key` to the scalar `value`, replacing it
    /// (and, if it was a table or array, its members).
    pub fn set_header(&mut self, key: &str, value: HeaderValue) {
        if let Some(i) = self
            .headers
            .iter()
            .position(|h| h.parent == 0 && h.key == key)
        {
            self.remove_subtree(i);
        }
        self.headers.push(Header {
            key: key.to_string(),
            value,
            parent: 0,
        });
    }

    /// Remove entry `i` and every entry nested under it, renumbering the
    /// parents of those after it.
    fn remove_subtree(&mut self, i: usize) {
        let mut gone = vec![false; self.headers.len()];
        gone[i] = true;
        for j in i + 1..self.headers.len() {
            let p = self.headers[j].parent as usize;
            gone[j] = p > 0 && gone[p - 1];
        }
        // New index of each kept entry.
        let mut index = Vec::with_capacity(gone.len());
        let mut next = 0u32;
        for g in &gone {
            index.push(next);
            if !g {
                next += 1;
            }
        }
        let mut kept = Vec::with_capacity(next as usize);
        for (j, h) in std::mem::take(&mut self.headers).into_iter().enumerate() {
            if gone[j] {
                continue;
            }
            let parent = match h.parent {
                0 => 0,
                p => index[p as usize - 1] + 1,
            };
            kept.push(Header { parent, ..h });
        }
        self.headers = kept;
    }
}

impl Message {
    /// A persistent message for `exchange` with `routing_key` and `body`,
    /// no other property set.
    pub fn new(exchange: &str, routing_key: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.into(),
            properties: Properties::default(),
        }
    }

    /// `d` again, to `exchange` with `routing_key`: the same body and every
    /// property and header exactly as it came (nested tables and arrays
    /// included). Warren adds only its own `traceparent`.
    pub fn forward(d: &Delivery, exchange: &str, routing_key: &str) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: d.body.clone(),
            properties: d.properties.clone(),
        }
    }

    /// Add (or replace) a text header.
    pub fn header(mut self, key: &str, value: &str) -> Self {
        self.properties
            .set_header(key, HeaderValue::Text(value.to_string()));
        self
    }

    /// Add (or replace) a header of any scalar type.
    pub fn header_value(mut self, key: &str, value: HeaderValue) -> Self {
        self.properties.set_header(key, value);
        self
    }

    /// Set the content type, e.g. `application/json`.
    pub fn content_type(mut self, v: &str) -> Self {
        self.properties.content_type = Some(v.to_string());
        self
    }

    /// Set the content encoding, e.g. `gzip`.
    pub fn content_encoding(mut self, v: &str) -> Self {
        self.properties.content_encoding = Some(v.to_string());
        self
    }

    /// Persistent (the default) or transient.
    pub fn persistent(mut self, yes: bool) -> Self {
        self.properties.delivery_mode = Some(if yes {
            DeliveryMode::Persistent
        } else {
            DeliveryMode::Transient
        });
        self
    }

    /// Set the priority (0 to 9 on RabbitMQ).
    pub fn priority(mut self, v: u8) -> Self {
        self.properties.priority = Some(v);
        self
    }

    /// Set the correlation id.
    pub fn correlation_id(mut self, v: &str) -> Self {
        self.properties.correlation_id = Some(v.to_string());
        self
    }

    /// Set where a reply is expected.
    pub fn reply_to(mut self, v: &str) -> Self {
        self.properties.reply_to = Some(v.to_string());
        self
    }

    /// Expire the message after `ms` milliseconds in a queue.
    pub fn expiration_ms(mut self, ms: u64) -> Self {
        self.properties.expiration = Some(ms.to_string());
        self
    }

    /// Set the message id.
    pub fn message_id(mut self, v: &str) -> Self {
        self.properties.message_id = Some(v.to_string());
        self
    }

    /// Set the timestamp, seconds since the Unix epoch.
    pub fn timestamp(mut self, secs: u64) -> Self {
        self.properties.timestamp = Some(secs);
        self
    }

    /// Set the AMQP `type` property.
    pub fn message_type(mut self, v: &str) -> Self {
        self.properties.message_type = Some(v.to_string());
        self
    }

    /// Set the user id (RabbitMQ refuses one that is not the connection's
    /// user).
    pub fn user_id(mut self, v: &str) -> Self {
        self.properties.user_id = Some(v.to_string());
        self
    }

    /// Set the application id.
    pub fn app_id(mut self, v: &str) -> Self {
        self.properties.app_id = Some(v.to_string());
        self
    }
}

impl Delivery {
    /// The top-level header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&HeaderValue> {
        self.properties.header(key)
    }

    /// Header `key` as text, if it is text.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        match self.header(key)? {
            HeaderValue::Text(s) => Some(s),
            _ => None,
        }
    }

    /// Header `key` as an integer, if it is one of any width.
    pub fn header_i64(&self, key: &str) -> Option<i64> {
        Some(match *self.header(key)? {
            HeaderValue::Int8(n) => n.into(),
            HeaderValue::Uint8(n) => n.into(),
            HeaderValue::Int16(n) => n.into(),
            HeaderValue::Uint16(n) => n.into(),
            HeaderValue::Int32(n) => n.into(),
            HeaderValue::Uint32(n) => n.into(),
            HeaderValue::Int(n) => n,
            _ => return None,
        })
    }

    /// Header `key` as a boolean, if it is one.
    pub fn header_bool(&self, key: &str) -> Option<bool> {
        match self.header(key)? {
            HeaderValue::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// The members of the table or array at index `i` of the header list,
    /// in order, as (index, header) pairs.
    pub fn members(&self, i: usize) -> impl Iterator<Item = (usize, &Header)> {
        let parent = u32::try_from(i + 1).unwrap_or(u32::MAX);
        self.properties
            .headers
            .iter()
            .enumerate()
            .filter(move |(_, h)| h.parent == parent)
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

    /// Retry after at least `delay_ms` (a downstream's `Retry-After`).
    pub fn retry_after(reason: impl std::fmt::Display, delay_ms: u32) -> Self {
        HandleError::RetryAfter(DelayedRetry {
            reason: reason.to_string(),
            delay_ms,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        let mut properties = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            delivery_mode: Some(DeliveryMode::Transient),
            priority: Some(5),
            correlation_id: Some("corr".into()),
            reply_to: Some("replies".into()),
            expiration: Some("60000".into()),
            message_id: Some("id-7".into()),
            timestamp: Some(1_700_000_000),
            message_type: Some("order".into()),
            user_id: Some("guest".into()),
            app_id: Some("shop".into()),
            ..Properties::default()
        };
        let h = |key: &str, value, parent| Header {
            key: key.into(),
            value,
            parent,
        };
        properties.headers = vec![
            h("tenant", HeaderValue::Text("acme".into()), 0),
            h("n", HeaderValue::Int16(-3), 0),
            h("t", HeaderValue::Table, 0),
            h(
                "a",
                HeaderValue::Decimal(Decimal {
                    scale: 1,
                    value: 15,
                }),
                3,
            ),
            h("inner", HeaderValue::Array, 3),
            h("", HeaderValue::ByteArray(vec![1, 2]), 5),
            h("flag", HeaderValue::Boolean(true), 0),
        ];
        Delivery {
            body: b"\x00\xffbody".to_vec(),
            exchange: "in".into(),
            routing_key: "k".into(),
            queue: "q".into(),
            properties,
            redelivered: false,
            attempt: 1,
        }
    }

    #[test]
    fn forward_keeps_every_property_and_header() {
        let d = delivery();
        let m = Message::forward(&d, "out", "rk");
        assert_eq!((m.exchange.as_str(), m.routing_key.as_str()), ("out", "rk"));
        assert_eq!(m.body, d.body);
        assert_eq!(m.properties, d.properties);
    }

    #[test]
    fn typed_header_accessors_read_top_level_headers() {
        let d = delivery();
        assert_eq!(d.header_str("tenant"), Some("acme"));
        assert_eq!(d.header_i64("n"), Some(-3));
        assert_eq!(d.header_bool("flag"), Some(true));
        // Members of a nested table are not top-level headers.
        assert_eq!(d.header("a"), None);
        let members: Vec<&str> = d.members(2).map(|(_, h)| h.key.as_str()).collect();
        assert_eq!(members, ["a", "inner"]);
    }

    #[test]
    fn replacing_a_table_drops_its_members_and_keeps_the_rest_consistent() {
        let mut p = delivery().properties;
        p.set_header("t", HeaderValue::Text("flat".into()));
        let keys: Vec<(&str, u32)> = p
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.parent))
            .collect();
        assert_eq!(keys, [("tenant", 0), ("n", 0), ("flag", 0), ("t", 0)]);
    }

    #[test]
    fn builders_set_each_property() {
        let m = Message::new("x", "k", "b")
            .content_type("text/plain")
            .content_encoding("br")
            .persistent(false)
            .priority(1)
            .correlation_id("c")
            .reply_to("r")
            .expiration_ms(500)
            .message_id("m")
            .timestamp(3)
            .message_type("t")
            .user_id("u")
            .app_id("a")
            .header("h", "v");
        let p = &m.properties;
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.content_encoding.as_deref(), Some("br"));
        assert_eq!(p.delivery_mode, Some(DeliveryMode::Transient));
        assert_eq!(p.priority, Some(1));
        assert_eq!(p.correlation_id.as_deref(), Some("c"));
        assert_eq!(p.reply_to.as_deref(), Some("r"));
        assert_eq!(p.expiration.as_deref(), Some("500"));
        assert_eq!(p.message_id.as_deref(), Some("m"));
        assert_eq!(p.timestamp, Some(3));
        assert_eq!(p.message_type.as_deref(), Some("t"));
        assert_eq!(p.user_id.as_deref(), Some("u"));
        assert_eq!(p.app_id.as_deref(), Some("a"));
        assert_eq!(p.header("h"), Some(&HeaderValue::Text("v".into())));
    }
}
