//! Conversions between Warren's [`MessageProperties`] / [`HeaderValue`] and
//! lapin's `BasicProperties` / `FieldTable`, in both directions.
//!
//! Lossless for every field type RabbitMQ sends, with two documented
//! folds on the way out: a `u64` header above `i64::MAX` (which only
//! Warren's own config can hold) is sent as an AMQP timestamp, the only
//! unsigned 64-bit field type; and a short string (`s` in the 0-9-1 spec,
//! never sent by RabbitMQ, which reads `s` as a 16-bit integer) is read as
//! text and written back as a long string. Does no I/O.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};

use crate::message::{HeaderValue, MessageProperties};

/// Lapin `BasicProperties` for `props`. Short strings longer than 255 bytes
/// are truncated by the protocol limit; Warren never produces such values.
pub fn to_basic_properties(props: &MessageProperties) -> BasicProperties {
    let mut p = BasicProperties::default();
    if let Some(v) = &props.content_type {
        p = p.with_content_type(short(v));
    }
    if let Some(v) = &props.content_encoding {
        p = p.with_content_encoding(short(v));
    }
    if let Some(v) = props.delivery_mode {
        p = p.with_delivery_mode(v);
    }
    if let Some(v) = props.priority {
        p = p.with_priority(v);
    }
    if let Some(v) = &props.correlation_id {
        p = p.with_correlation_id(short(v));
    }
    if let Some(v) = &props.reply_to {
        p = p.with_reply_to(short(v));
    }
    if let Some(v) = &props.expiration {
        p = p.with_expiration(short(v));
    }
    if let Some(v) = &props.message_id {
        p = p.with_message_id(short(v));
    }
    if let Some(v) = props.timestamp {
        p = p.with_timestamp(v);
    }
    if let Some(v) = &props.kind {
        p = p.with_type(short(v));
    }
    if let Some(v) = &props.user_id {
        p = p.with_user_id(short(v));
    }
    if let Some(v) = &props.app_id {
        p = p.with_app_id(short(v));
    }
    if !props.headers.is_empty() {
        p = p.with_headers(to_field_table(&props.headers));
    }
    p
}

/// Warren `MessageProperties` from a lapin delivery's properties.
pub fn from_basic_properties(p: &BasicProperties) -> MessageProperties {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    MessageProperties {
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        expiration: s(p.expiration()),
        message_id: s(p.message_id()),
        timestamp: *p.timestamp(),
        kind: s(p.kind()),
        user_id: s(p.user_id()),
        app_id: s(p.app_id()),
        headers: p
            .headers()
            .as_ref()
            .map(from_field_table)
            .unwrap_or_default(),
    }
}

/// A lapin `FieldTable` from ordered Warren headers (AMQP tables are maps;
/// keys are unique in Warren so nothing is lost but the order).
pub fn to_field_table(headers: &[(String, HeaderValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(short(k), to_amqp_value(v));
    }
    t
}

/// Warren headers from a lapin `FieldTable` (sorted by key, as lapin keeps
/// them).
pub fn from_field_table(t: &FieldTable) -> Vec<(String, HeaderValue)> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), from_amqp_value(v)))
        .collect()
}

/// One Warren header value as an AMQP field value.
pub fn to_amqp_value(v: &HeaderValue) -> AMQPValue {
    match v {
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::I8(n) => AMQPValue::ShortShortInt(*n),
        HeaderValue::U8(n) => AMQPValue::ShortShortUInt(*n),
        HeaderValue::I16(n) => AMQPValue::ShortInt(*n),
        HeaderValue::U16(n) => AMQPValue::ShortUInt(*n),
        HeaderValue::I32(n) => AMQPValue::LongInt(*n),
        HeaderValue::U32(n) => AMQPValue::LongUInt(*n),
        HeaderValue::I64(n) => AMQPValue::LongLongInt(*n),
        HeaderValue::U64(n) => match i64::try_from(*n) {
            Ok(i) => AMQPValue::LongLongInt(i),
            Err(_) => AMQPValue::Timestamp(*n),
        },
        HeaderValue::F32(f) => AMQPValue::Float(*f),
        HeaderValue::F64(f) => AMQPValue::Double(*f),
        HeaderValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        HeaderValue::Bytes(b) => AMQPValue::LongString(LongString::from(b.to_vec())),
        HeaderValue::ByteArray(b) => AMQPValue::ByteArray(b.to_vec().into()),
        HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        HeaderValue::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp_value).collect::<Vec<_>>(),
        )),
        HeaderValue::Table(entries) => AMQPValue::FieldTable(to_field_table(entries)),
        HeaderValue::Void => AMQPValue::Void,
    }
}

/// One AMQP field value as a Warren header value.
pub fn from_amqp_value(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => HeaderValue::I8(*n),
        AMQPValue::ShortShortUInt(n) => HeaderValue::U8(*n),
        AMQPValue::ShortInt(n) => HeaderValue::I16(*n),
        AMQPValue::ShortUInt(n) => HeaderValue::U16(*n),
        AMQPValue::LongInt(n) => HeaderValue::I32(*n),
        AMQPValue::LongUInt(n) => HeaderValue::U32(*n),
        AMQPValue::LongLongInt(n) => HeaderValue::I64(*n),
        AMQPValue::Float(f) => HeaderValue::F32(*f),
        AMQPValue::Double(f) => HeaderValue::F64(*f),
        AMQPValue::DecimalValue(d) => HeaderValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => bytes_or_text(s.as_bytes()),
        AMQPValue::FieldArray(a) => {
            HeaderValue::Array(a.as_slice().iter().map(from_amqp_value).collect())
        }
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => HeaderValue::Table(from_field_table(t)),
        AMQPValue::ByteArray(b) => HeaderValue::ByteArray(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => HeaderValue::Void,
    }
}

fn bytes_or_text(b: &[u8]) -> HeaderValue {
    match std::str::from_utf8(b) {
        Ok(s) => HeaderValue::String(s.to_owned()),
        Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(b)),
    }
}

/// A short string, truncated at a character boundary to the 255-byte limit.
pub(crate) fn short(s: &str) -> ShortString {
    if s.len() <= 255 {
        return ShortString::from(s);
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let mut p = MessageProperties::persistent();
        p.content_type = Some("application/json".into());
        p.content_encoding = Some("gzip".into());
        p.priority = Some(3);
        p.correlation_id = Some("c".into());
        p.reply_to = Some("r".into());
        p.expiration = Some("6000".into());
        p.message_id = Some("m".into());
        p.timestamp = Some(1_700_000_000);
        p.kind = Some("t".into());
        p.user_id = Some("guest".into());
        p.app_id = Some("warren".into());
        p.set_header("a-bool", HeaderValue::Bool(true));
        p.set_header("b-i64", HeaderValue::I64(-5));
        p.set_header("c-str", HeaderValue::String("x".into()));
        p.set_header(
            "d-bytes",
            HeaderValue::Bytes(Bytes::from_static(&[0xff, 0])),
        );
        p.set_header(
            "e-table",
            HeaderValue::Table(vec![(
                "k".into(),
                HeaderValue::Array(vec![HeaderValue::Void]),
            )]),
        );
        p.set_header(
            "f-dec",
            HeaderValue::Decimal {
                scale: 2,
                value: 314,
            },
        );
        p.set_header("g-ts", HeaderValue::Timestamp(9));
        p.set_header(
            "h-byte-array",
            HeaderValue::ByteArray(Bytes::from_static(&[1, 2, 0xff])),
        );
        p.set_header("i-f32", HeaderValue::F32(1.5));
        p.set_header("j-u8", HeaderValue::U8(200));
        let back = from_basic_properties(&to_basic_properties(&p));
        assert_eq!(back, p);
    }

    #[test]
    fn u64_folds() {
        assert_eq!(
            from_amqp_value(&to_amqp_value(&HeaderValue::U64(7))),
            HeaderValue::I64(7)
        );
        assert_eq!(
            from_amqp_value(&to_amqp_value(&HeaderValue::U64(u64::MAX))),
            HeaderValue::Timestamp(u64::MAX)
        );
    }

    #[test]
    fn short_truncates_on_char_boundary() {
        let s = "é".repeat(200);
        assert!(short(&s).as_str().len() <= 255);
    }
}
