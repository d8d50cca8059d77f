//! The contract's `properties` record and the host's [`MessageProperties`],
//! both ways, losslessly: every basic property, and every header field type
//! with nested tables and arrays flattened into the contract's header list
//! (a member names its table or array as `parent`: 1 + that entry's index,
//! always earlier in the list; top-level headers have parent 0). A plugin
//! that copies the list copies every nested value unchanged.
//!
//! Does no I/O and decides nothing: a header list that does not describe a
//! tree is an error for the caller to report.

use bytes::Bytes;

use super::bindings as wit;
use crate::message::{HeaderValue, MessageProperties};

/// The contract form of `p`.
pub(crate) fn to_wit(p: &MessageProperties) -> wit::Properties {
    let mut headers = Vec::with_capacity(p.headers.len());
    for (k, v) in &p.headers {
        flatten(&mut headers, k, v, 0);
    }
    wit::Properties {
        content_type: p.content_type.clone(),
        content_encoding: p.content_encoding.clone(),
        headers,
        delivery_mode: p.delivery_mode.map(|m| {
            if m == 1 {
                wit::DeliveryMode::Transient
            } else {
                wit::DeliveryMode::Persistent
            }
        }),
        priority: p.priority,
        correlation_id: p.correlation_id.clone(),
        reply_to: p.reply_to.clone(),
        expiration: p.expiration.clone(),
        message_id: p.message_id.clone(),
        timestamp: p.timestamp,
        message_type: p.kind.clone(),
        user_id: p.user_id.clone(),
        app_id: p.app_id.clone(),
    }
}

/// The host form of a plugin's `properties`; absent delivery mode means
/// persistent. Fails when the header list is not a tree.
pub(crate) fn from_wit(p: wit::Properties) -> Result<MessageProperties, String> {
    Ok(MessageProperties {
        content_type: p.content_type,
        content_encoding: p.content_encoding,
        delivery_mode: Some(match p.delivery_mode {
            Some(wit::DeliveryMode::Transient) => 1,
            Some(wit::DeliveryMode::Persistent) | None => 2,
        }),
        priority: p.priority,
        correlation_id: p.correlation_id,
        reply_to: p.reply_to,
        expiration: p.expiration,
        message_id: p.message_id,
        timestamp: p.timestamp,
        kind: p.message_type,
        user_id: p.user_id,
        app_id: p.app_id,
        headers: unflatten(p.headers)?,
    })
}

/// Push `v` (named `key`, member of entry `parent` - 1, or top-level when
/// `parent` is 0) and, after it, its members.
fn flatten(out: &mut Vec<wit::Header>, key: &str, v: &HeaderValue, parent: u32) {
    let here = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out.push(wit::Header {
        key: key.to_owned(),
        value: scalar_to_wit(v),
        parent,
    });
    match v {
        HeaderValue::Table(entries) => {
            for (k, member) in entries {
                flatten(out, k, member, here + 1);
            }
        }
        HeaderValue::Array(items) => {
            for member in items {
                flatten(out, "", member, here + 1);
            }
        }
        _ => {}
    }
}

/// Where a flattened entry goes while the tree is rebuilt.
enum Slot {
    Value(String, HeaderValue),
    /// A table or array whose members are still being collected.
    Open(String, bool, Vec<usize>),
}

/// Deepest nesting a plugin's headers may have (the tree is rebuilt and
/// encoded recursively).
pub(crate) const MAX_DEPTH: usize = 64;

fn unflatten(headers: Vec<wit::Header>) -> Result<Vec<(String, HeaderValue)>, String> {
    let mut slots: Vec<Slot> = Vec::with_capacity(headers.len());
    let mut depths: Vec<usize> = Vec::with_capacity(headers.len());
    let mut top = Vec::new();
    for (i, h) in headers.into_iter().enumerate() {
        let depth = match h.parent {
            0 => {
                top.push(i);
                0
            }
            p => match slots.get_mut(p as usize - 1) {
                Some(Slot::Open(_, _, members)) => {
                    members.push(i);
                    depths[p as usize - 1] + 1
                }
                _ => {
                    return Err(format!(
                        "header {i} ({:?}) names parent {p}, which is not an earlier table or array",
                        h.key
                    ));
                }
            },
        };
        if depth > MAX_DEPTH {
            return Err(format!(
                "header {i} ({:?}) is nested {depth} deep; the limit is {MAX_DEPTH}",
                h.key
            ));
        }
        depths.push(depth);
        slots.push(match h.value {
            wit::HeaderValue::Table => Slot::Open(h.key, true, Vec::new()),
            wit::HeaderValue::Array => Slot::Open(h.key, false, Vec::new()),
            v => Slot::Value(h.key, scalar_from_wit(v)),
        });
    }
    let mut taken: Vec<Option<Slot>> = slots.into_iter().map(Some).collect();
    top.into_iter().map(|i| build(&mut taken, i)).collect()
}

/// The tree rooted at entry `i`. Members always come after their parent,
/// so building from the back never needs an entry already taken.
fn build(slots: &mut [Option<Slot>], i: usize) -> Result<(String, HeaderValue), String> {
    match slots.get_mut(i).and_then(Option::take) {
        Some(Slot::Value(k, v)) => Ok((k, v)),
        Some(Slot::Open(k, is_table, members)) => {
            let built = members
                .into_iter()
                .map(|m| build(slots, m))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((
                k,
                if is_table {
                    HeaderValue::Table(built)
                } else {
                    HeaderValue::Array(built.into_iter().map(|(_, v)| v).collect())
                },
            ))
        }
        None => Err(format!("header {i} is a member twice")),
    }
}

fn scalar_to_wit(v: &HeaderValue) -> wit::HeaderValue {
    match v {
        HeaderValue::Bool(b) => wit::HeaderValue::Boolean(*b),
        HeaderValue::I8(n) => wit::HeaderValue::Int8(*n),
        HeaderValue::U8(n) => wit::HeaderValue::Uint8(*n),
        HeaderValue::I16(n) => wit::HeaderValue::Int16(*n),
        HeaderValue::U16(n) => wit::HeaderValue::Uint16(*n),
        HeaderValue::I32(n) => wit::HeaderValue::Int32(*n),
        HeaderValue::U32(n) => wit::HeaderValue::Uint32(*n),
        HeaderValue::I64(n) => wit::HeaderValue::Int(*n),
        // As on the wire (see `amqp::convert`): AMQP has no unsigned
        // 64-bit integer but the timestamp.
        HeaderValue::U64(n) => match i64::try_from(*n) {
            Ok(i) => wit::HeaderValue::Int(i),
            Err(_) => wit::HeaderValue::Timestamp(*n),
        },
        HeaderValue::F32(f) => wit::HeaderValue::Float32(*f),
        HeaderValue::F64(f) => wit::HeaderValue::Float(*f),
        HeaderValue::Decimal { scale, value } => wit::HeaderValue::Decimal(wit::Decimal {
            scale: *scale,
            value: *value,
        }),
        HeaderValue::String(s) => wit::HeaderValue::Text(s.clone()),
        HeaderValue::Bytes(b) => wit::HeaderValue::Bytes(b.to_vec()),
        HeaderValue::ByteArray(b) => wit::HeaderValue::ByteArray(b.to_vec()),
        HeaderValue::Timestamp(t) => wit::HeaderValue::Timestamp(*t),
        HeaderValue::Void => wit::HeaderValue::Void,
        HeaderValue::Table(_) => wit::HeaderValue::Table,
        HeaderValue::Array(_) => wit::HeaderValue::Array,
    }
}

/// A scalar (tables and arrays are rebuilt by [`unflatten`]).
fn scalar_from_wit(v: wit::HeaderValue) -> HeaderValue {
    match v {
        wit::HeaderValue::Text(s) => HeaderValue::String(s),
        wit::HeaderValue::Bytes(b) => HeaderValue::Bytes(Bytes::from(b)),
        wit::HeaderValue::ByteArray(b) => HeaderValue::ByteArray(Bytes::from(b)),
        wit::HeaderValue::Boolean(b) => HeaderValue::Bool(b),
        wit::HeaderValue::Int8(n) => HeaderValue::I8(n),
        wit::HeaderValue::Uint8(n) => HeaderValue::U8(n),
        wit::HeaderValue::Int16(n) => HeaderValue::I16(n),
        wit::HeaderValue::Uint16(n) => HeaderValue::U16(n),
        wit::HeaderValue::Int32(n) => HeaderValue::I32(n),
        wit::HeaderValue::Uint32(n) => HeaderValue::U32(n),
        wit::HeaderValue::Int(n) => HeaderValue::I64(n),
        wit::HeaderValue::Float32(f) => HeaderValue::F32(f),
        wit::HeaderValue::Float(f) => HeaderValue::F64(f),
        wit::HeaderValue::Decimal(d) => HeaderValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        wit::HeaderValue::Timestamp(t) => HeaderValue::Timestamp(t),
        wit::HeaderValue::Void => HeaderValue::Void,
        wit::HeaderValue::Table => HeaderValue::Table(Vec::new()),
        wit::HeaderValue::Array => HeaderValue::Array(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_type() -> MessageProperties {
        let mut p = MessageProperties::persistent();
        p.content_type = Some("application/json".into());
        p.content_encoding = Some("gzip".into());
        p.priority = Some(7);
        p.correlation_id = Some("corr".into());
        p.reply_to = Some("replies".into());
        p.expiration = Some("60000".into());
        p.message_id = Some("id-1".into());
        p.timestamp = Some(1_700_000_000);
        p.kind = Some("order.created".into());
        p.user_id = Some("guest".into());
        p.app_id = Some("shop".into());
        let headers = [
            ("bool", HeaderValue::Bool(true)),
            ("i8", HeaderValue::I8(-8)),
            ("u8", HeaderValue::U8(8)),
            ("i16", HeaderValue::I16(-16)),
            ("u16", HeaderValue::U16(16)),
            ("i32", HeaderValue::I32(-32)),
            ("u32", HeaderValue::U32(32)),
            ("i64", HeaderValue::I64(-64)),
            ("f32", HeaderValue::F32(1.5)),
            ("f64", HeaderValue::F64(2.25)),
            (
                "decimal",
                HeaderValue::Decimal {
                    scale: 1,
                    value: 15,
                },
            ),
            ("text", HeaderValue::String("x".into())),
            ("bytes", HeaderValue::Bytes(Bytes::from_static(&[0xff, 0]))),
            (
                "byte-array",
                HeaderValue::ByteArray(Bytes::from_static(&[1, 2])),
            ),
            ("ts", HeaderValue::Timestamp(9)),
            ("void", HeaderValue::Void),
            (
                "nested",
                HeaderValue::Table(vec![
                    ("a".into(), HeaderValue::I32(1)),
                    (
                        "b".into(),
                        HeaderValue::Table(vec![(
                            "c".into(),
                            HeaderValue::Table(vec![("d".into(), HeaderValue::String("x".into()))]),
                        )]),
                    ),
                ]),
            ),
            (
                "array",
                HeaderValue::Array(vec![
                    HeaderValue::I64(1),
                    HeaderValue::String("two".into()),
                    HeaderValue::Table(vec![("k".into(), HeaderValue::Array(vec![]))]),
                    HeaderValue::Table(vec![]),
                ]),
            ),
        ];
        for (k, v) in headers {
            p.set_header(k, v);
        }
        p
    }

    #[test]
    fn every_property_and_field_type_round_trips() {
        let p = every_type();
        assert_eq!(from_wit(to_wit(&p)).unwrap(), p);
    }

    #[test]
    fn members_follow_and_name_their_parent() {
        let w = to_wit(&every_type());
        let nested = w.headers.iter().position(|h| h.key == "nested").unwrap();
        let a = &w.headers[nested + 1];
        assert_eq!((a.key.as_str(), a.parent), ("a", nested as u32 + 1));
        assert!(w.headers.iter().filter(|h| h.parent == 0).count() == 18);
    }

    #[test]
    fn a_list_that_is_not_a_tree_is_refused() {
        let mut w = to_wit(&every_type());
        // A member of a scalar.
        w.headers[2].parent = 1;
        assert!(
            from_wit(w)
                .unwrap_err()
                .contains("not an earlier table or array")
        );
        let mut w = to_wit(&MessageProperties::default());
        w.headers.push(wit::Header {
            key: "x".into(),
            value: wit::HeaderValue::Void,
            parent: 5,
        });
        assert!(from_wit(w).is_err());
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        let mut w = to_wit(&MessageProperties::default());
        for i in 0..=MAX_DEPTH as u32 + 1 {
            w.headers.push(wit::Header {
                key: format!("t{i}"),
                value: wit::HeaderValue::Table,
                parent: i,
            });
        }
        assert!(from_wit(w).unwrap_err().contains("nested"));
    }

    #[test]
    fn a_message_without_a_delivery_mode_is_persistent() {
        let w = to_wit(&MessageProperties::default());
        assert_eq!(from_wit(w).unwrap().delivery_mode, Some(2));
    }
}
