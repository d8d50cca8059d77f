//! The one message type that crosses subsystems: what Warren publishes.
//!
//! A plugin output, an admin `POST /publish`, a dead-lettered delivery and a
//! spooled entry are all an [`OutboundMessage`]. `amqp` turns it into a lapin
//! publish, `buffer` stores it in a Redis Stream and reads it back unchanged,
//! `plugins` builds it from what a guest passed to `publish`. This module is a
//! leaf: it knows none of them, and it does no I/O.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A message to publish, with every property needed to publish it again
/// byte for byte after a stay in the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// Exchange name; empty is the default exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP basic properties and headers.
    pub properties: MessageProperties,
    /// The body.
    #[serde(with = "body_bytes")]
    pub body: Bytes,
}

impl OutboundMessage {
    /// A persistent message with no other properties.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: MessageProperties::persistent(),
            body: body.into(),
        }
    }

    /// The value of header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&HeaderValue> {
        self.properties.header(key)
    }
}

/// The AMQP 0-9-1 basic properties Warren carries. Absent means "not set".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MessageProperties {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// 1 = transient, 2 = persistent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Application headers in order. Keys are unique.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, HeaderValue)>,
}

impl MessageProperties {
    /// Properties of a persistent message (delivery mode 2).
    pub fn persistent() -> Self {
        Self {
            delivery_mode: Some(2),
            ..Self::default()
        }
    }

    /// The value of header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&HeaderValue> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Set header `key`, replacing an existing value.
    pub fn set_header(&mut self, key: impl Into<String>, value: HeaderValue) {
        let key = key.into();
        match self.headers.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.headers.push((key, value)),
        }
    }
}

/// An AMQP field value, covering every type the 0-9-1 field table has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "snake_case")]
pub enum HeaderValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Decimal {
        scale: u8,
        value: u32,
    },
    /// Long or short string. AMQP strings are bytes; Warren keeps text as
    /// `String` and anything not UTF-8 as `Bytes`.
    String(String),
    Bytes(#[serde(with = "body_bytes")] Bytes),
    /// An AMQP byte array (`x`), kept apart from a long string so it is
    /// published as the type it came as.
    ByteArray(#[serde(with = "body_bytes")] Bytes),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    Array(Vec<HeaderValue>),
    Table(Vec<(String, HeaderValue)>),
    Void,
}

impl HeaderValue {
    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer value of any width, widened to `i64` (`u64` above
    /// `i64::MAX` is not an `i64`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            HeaderValue::I8(v) => Some(v.into()),
            HeaderValue::U8(v) => Some(v.into()),
            HeaderValue::I16(v) => Some(v.into()),
            HeaderValue::U16(v) => Some(v.into()),
            HeaderValue::I32(v) => Some(v.into()),
            HeaderValue::U32(v) => Some(v.into()),
            HeaderValue::I64(v) => Some(v),
            HeaderValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// Bodies serialise as base64 text in human-readable formats (JSON) and as
/// raw bytes otherwise.
mod body_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(b))
        } else {
            s.serialize_bytes(b)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            STANDARD
                .decode(text)
                .map(Bytes::from)
                .map_err(D::Error::custom)
        } else {
            let raw: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
            Ok(Bytes::from(raw.into_vec()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_property_and_binary_body() {
        let mut m = OutboundMessage::new("ex", "rk", Bytes::from_static(&[0, 159, 146, 150]));
        m.properties.message_id = Some("id-1".into());
        m.properties.timestamp = Some(1_700_000_000);
        m.properties.set_header(
            "traceparent",
            HeaderValue::String("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        m.properties.set_header(
            "nested",
            HeaderValue::Table(vec![(
                "a".into(),
                HeaderValue::Array(vec![HeaderValue::I64(-1), HeaderValue::Void]),
            )]),
        );
        let text = serde_json::to_string(&m).unwrap();
        let back: OutboundMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn set_header_replaces() {
        let mut p = MessageProperties::default();
        p.set_header("k", HeaderValue::I32(1));
        p.set_header("k", HeaderValue::I32(2));
        assert_eq!(p.headers.len(), 1);
        assert_eq!(p.header("k").and_then(HeaderValue::as_i64), Some(2));
    }
}
