//! The offline commands: `warren check` and `warren invoke`. They need no
//! broker and no Redis, only the plugin runtime.
//!
//! Output is JSON on stdout; errors are one line on stderr naming the file
//! and the problem.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::message::{HeaderValue, MessageProperties, OutboundMessage};
use crate::plugins::{
    Delivery, LimitsOverride, Outcome, PluginRuntime, PluginSettings, RuntimeConfig,
};

/// Arguments of `warren invoke`.
#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// Plugin component file (.wasm).
    pub file: PathBuf,
    /// Message body, as text.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the message body from a file.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// A header, `key=value` (text) or `key=TYPE:value` with TYPE one of
    /// text, int8, uint8, int16, uint16, int32, uint32, int, float32,
    /// float, decimal (e.g. `decimal:1.50`), bool, timestamp, bytes and
    /// byte-array (base64), void, table and array (JSON); repeatable.
    #[arg(long = "header", value_name = "KEY=[TYPE:]VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, HeaderValue)>,
    /// A basic property, `name=value`: content-type, content-encoding,
    /// delivery-mode (1, 2, transient, persistent), priority,
    /// correlation-id, reply-to, expiration, message-id, timestamp, type,
    /// user-id, app-id; repeatable.
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub properties: Vec<(String, String)>,
    /// Routing key of the delivery.
    #[arg(long, default_value = "")]
    pub routing_key: String,
    /// Exchange of the delivery.
    #[arg(long, default_value = "")]
    pub exchange: String,
    /// Queue of the delivery (default: the plugin's first subscription).
    #[arg(long)]
    pub queue: Option<String>,
    /// Content type property.
    #[arg(long)]
    pub content_type: Option<String>,
    /// A value for the plugin's `config(key)`, `key=value`; repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub config: Vec<(String, String)>,
    /// Grant the plugin an outbound origin (`http://localhost:8080`) or an
    /// address range (`127.0.0.0/8`), as `[plugin.<name>] allow-outbound`
    /// does; repeatable. Calls are real and meet the same rules as under
    /// `warren run`.
    #[arg(long = "allow-outbound", value_name = "ORIGIN|CIDR")]
    pub allow_outbound: Vec<String>,
    /// Attempt number to report to the plugin.
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,
    /// Mark the delivery as redelivered.
    #[arg(long)]
    pub redelivered: bool,
    /// Override the plugin's deadline, in milliseconds.
    #[arg(long)]
    pub deadline_ms: Option<u32>,
    /// Override the plugin's memory limit, in bytes.
    #[arg(long)]
    pub memory_bytes: Option<u64>,
    /// Key-value state the plugin starts with: a JSON object of keys and
    /// values (a string is stored as its text, anything else as its JSON).
    /// The state lives in memory for this run; the writes the delivery
    /// would commit are printed beside its outputs (`writes`).
    #[arg(long, value_name = "FILE")]
    pub kv_seed: Option<PathBuf>,
}

/// The values of a `--kv-seed` file.
fn read_kv_seed(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the key-value seed: {e}", path.display()))?;
    let Value::Object(map) = serde_json::from_str::<Value>(&text)
        .map_err(|e| format!("{}: not JSON: {e}", path.display()))?
    else {
        return Err(format!(
            "{}: the key-value seed must be a JSON object of keys and values",
            path.display()
        ));
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let bytes = match v {
                Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            (k, bytes)
        })
        .collect())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A `--header` argument: `key=value`, or `key=TYPE:value`.
fn parse_header(s: &str) -> Result<(String, HeaderValue), String> {
    let (key, value) = parse_pair(s)?;
    let typed = value.split_once(':').and_then(|(ty, v)| {
        let parsed: Option<Result<HeaderValue, String>> = Some(match ty {
            "text" => Ok(HeaderValue::String(v.to_owned())),
            "int8" => v.parse().map(HeaderValue::I8).map_err(|e| e.to_string()),
            "uint8" => v.parse().map(HeaderValue::U8).map_err(|e| e.to_string()),
            "int16" => v.parse().map(HeaderValue::I16).map_err(|e| e.to_string()),
            "uint16" => v.parse().map(HeaderValue::U16).map_err(|e| e.to_string()),
            "int32" => v.parse().map(HeaderValue::I32).map_err(|e| e.to_string()),
            "uint32" => v.parse().map(HeaderValue::U32).map_err(|e| e.to_string()),
            "int" => v.parse().map(HeaderValue::I64).map_err(|e| e.to_string()),
            "float32" => v.parse().map(HeaderValue::F32).map_err(|e| e.to_string()),
            "float" => v.parse().map(HeaderValue::F64).map_err(|e| e.to_string()),
            "bool" => v.parse().map(HeaderValue::Bool).map_err(|e| e.to_string()),
            "timestamp" => v
                .parse()
                .map(HeaderValue::Timestamp)
                .map_err(|e| e.to_string()),
            "decimal" => parse_decimal(v),
            "bytes" | "byte-array" => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map(|b| {
                    if ty == "bytes" {
                        HeaderValue::Bytes(Bytes::from(b))
                    } else {
                        HeaderValue::ByteArray(Bytes::from(b))
                    }
                })
                .map_err(|e| e.to_string()),
            "void" => Ok(HeaderValue::Void),
            "table" | "array" => serde_json::from_str::<Value>(v)
                .map_err(|e| e.to_string())
                .and_then(|j| match (ty, &j) {
                    ("table", Value::Object(_)) | ("array", Value::Array(_)) => Ok(from_json(&j)),
                    _ => Err(format!(
                        "not a JSON {}",
                        if ty == "table" { "object" } else { "array" }
                    )),
                }),
            // Not a type name: the whole value is text (e.g. a URL).
            _ => return None,
        });
        parsed.map(|r| r.map_err(|e| format!("header {key:?}: {ty} value {v:?}: {e}")))
    });
    match typed {
        Some(v) => Ok((key, v?)),
        None => Ok((key, HeaderValue::String(value))),
    }
}

/// `1.50` as a decimal (scale 2, value 150).
fn parse_decimal(v: &str) -> Result<HeaderValue, String> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let scale = u8::try_from(frac.len()).map_err(|_| "too many digits".to_owned())?;
    let value = format!("{int}{frac}")
        .parse::<u32>()
        .map_err(|e| format!("{e} (a decimal is unsigned, at most 4294967295 unscaled)"))?;
    Ok(HeaderValue::Decimal { scale, value })
}

/// A JSON value as header values: integers as `int`, other numbers as
/// `float`, objects as tables, arrays as arrays, null as void.
fn from_json(j: &Value) -> HeaderValue {
    match j {
        Value::Null => HeaderValue::Void,
        Value::Bool(b) => HeaderValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => HeaderValue::I64(i),
            None => HeaderValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => HeaderValue::String(s.clone()),
        Value::Array(a) => HeaderValue::Array(a.iter().map(from_json).collect()),
        Value::Object(o) => {
            HeaderValue::Table(o.iter().map(|(k, v)| (k.clone(), from_json(v))).collect())
        }
    }
}

/// Set the basic property `name` of `p` from `--property name=value`.
fn set_property(p: &mut MessageProperties, name: &str, value: &str) -> Result<(), String> {
    let text = Some(value.to_owned());
    let number = |what: &str| format!("property {name}: {value:?} is not {what}");
    match name {
        "content-type" => p.content_type = text,
        "content-encoding" => p.content_encoding = text,
        "delivery-mode" => {
            p.delivery_mode = Some(match value {
                "1" | "transient" => 1,
                "2" | "persistent" => 2,
                _ => return Err(number("1, 2, transient or persistent")),
            })
        }
        "priority" => p.priority = Some(value.parse().map_err(|_| number("0 to 255"))?),
        "correlation-id" => p.correlation_id = text,
        "reply-to" => p.reply_to = text,
        "expiration" => p.expiration = text,
        "message-id" => p.message_id = text,
        "timestamp" => {
            p.timestamp = Some(
                value
                    .parse()
                    .map_err(|_| number("seconds since the epoch"))?,
            )
        }
        "type" => p.kind = text,
        "user-id" => p.user_id = text,
        "app-id" => p.app_id = text,
        _ => {
            return Err(format!(
                "unknown property {name:?}; known: content-type, content-encoding, delivery-mode, priority, correlation-id, reply-to, expiration, message-id, timestamp, type, user-id, app-id"
            ));
        }
    }
    Ok(())
}

/// The runtime of the offline commands: default settings, and key-value
/// state in memory.
fn runtime() -> Result<PluginRuntime, ExitCode> {
    let kv = crate::kv::Store::memory(crate::kv::KvConfig::default().limits());
    PluginRuntime::with_kv(RuntimeConfig::default(), Some(kv)).map_err(|e| {
        eprintln!("warren: {e}");
        ExitCode::FAILURE
    })
}

fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// `warren check FILE...`: exit 0 only if every file is a valid plugin.
pub async fn check(files: &[PathBuf]) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut ok = true;
    let mut reports = Vec::new();
    for file in files {
        match rt.load_file(file, &PluginSettings::default()).await {
            Ok(plugin) => reports.push(json!({
                "file": file,
                "manifest": plugin.manifest(),
                "limits": plugin.limits(),
                "outbound": plugin.grants(),
            })),
            Err(e) => {
                ok = false;
                eprintln!("warren: {e}");
            }
        }
    }
    match reports.len() {
        0 => {}
        1 => print_json(&reports[0]),
        _ => print_json(&Value::Array(reports)),
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `warren invoke FILE ...`: one delivery through the sandbox.
pub async fn invoke(args: InvokeArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let body = match (&args.body, &args.body_file) {
        (_, Some(path)) => match std::fs::read(path) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                eprintln!("warren: {}: cannot read body file: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        (Some(text), None) => Bytes::from(text.clone().into_bytes()),
        (None, None) => Bytes::new(),
    };
    let settings = PluginSettings {
        limits: LimitsOverride {
            memory_bytes: args.memory_bytes,
            deadline_ms: args.deadline_ms,
            ..LimitsOverride::default()
        },
        config: args.config.iter().cloned().collect::<BTreeMap<_, _>>(),
        allow_outbound: args.allow_outbound.clone(),
        ..PluginSettings::default()
    };
    let plugin = match rt.load_file(&args.file, &settings).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.kv_seed {
        let seeded = read_kv_seed(path).and_then(|values| match plugin.kv() {
            Some(ns) => ns.seed(values).map_err(|e| e.to_string()),
            None => Err(format!(
                "--kv-seed: plugin {} does not declare `state` in its manifest",
                plugin.name()
            )),
        });
        if let Err(e) = seeded {
            eprintln!("warren: {e}");
            return ExitCode::from(2);
        }
    }
    let mut properties = MessageProperties {
        content_type: args.content_type.clone(),
        ..MessageProperties::default()
    };
    for (name, value) in &args.properties {
        if let Err(e) = set_property(&mut properties, name, value) {
            eprintln!("warren: {e}");
            return ExitCode::from(2);
        }
    }
    for (k, v) in &args.headers {
        properties.set_header(k.clone(), v.clone());
    }
    let queue = args.queue.clone().unwrap_or_else(|| {
        plugin
            .manifest()
            .subscriptions
            .first()
            .map(|s| s.queue.clone())
            .unwrap_or_default()
    });
    let delivery = Delivery {
        body,
        exchange: args.exchange.clone(),
        routing_key: args.routing_key.clone(),
        queue,
        properties,
        redelivered: args.redelivered,
        attempt: args.attempt,
    };
    let (outcome, calls) = plugin.invoke_with_calls(&delivery).await;
    let mut printed = outcome_json(plugin.path(), plugin.name(), plugin.version(), &outcome);
    if !calls.is_empty() {
        printed["calls"] = json!(calls);
    }
    print_json(&printed);
    match outcome {
        Outcome::Ack { .. } => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// The JSON `warren invoke` prints: bodies as text when they are UTF-8,
/// else as base64.
pub fn outcome_json(file: &Path, name: &str, version: &str, outcome: &Outcome) -> Value {
    let mut v = json!({ "file": file, "plugin": name, "version": version });
    match outcome {
        Outcome::Ack { outputs, writes } => {
            v["outcome"] = json!("ack");
            v["outputs"] = Value::Array(outputs.iter().map(output_json).collect());
            if !writes.is_empty() {
                v["writes"] = json!(writes);
            }
        }
        Outcome::Retry { reason, delay } => {
            v["outcome"] = json!("retry");
            v["reason"] = json!(reason);
            if let Some(d) = delay {
                v["delay_ms"] = json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
        }
        Outcome::Reject { reason } => {
            v["outcome"] = json!("reject");
            v["reason"] = json!(reason);
        }
        Outcome::Trapped { kind, message } => {
            v["outcome"] = json!("trapped");
            v["trap"] = json!(kind);
            v["message"] = json!(message);
        }
    }
    v
}

fn output_json(m: &OutboundMessage) -> Value {
    let mut v = json!({
        "exchange": m.exchange,
        "routing_key": m.routing_key,
        "properties": m.properties,
    });
    match std::str::from_utf8(&m.body) {
        Ok(text) => v["body"] = json!(text),
        Err(_) => {
            v["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&m.body))
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_with_and_without_a_type() {
        let h = |s| parse_header(s).unwrap().1;
        assert_eq!(h("k=plain"), HeaderValue::String("plain".into()));
        assert_eq!(h("k=http://x"), HeaderValue::String("http://x".into()));
        assert_eq!(h("k=int16:-3"), HeaderValue::I16(-3));
        assert_eq!(h("k=uint8:200"), HeaderValue::U8(200));
        assert_eq!(h("k=float32:1.5"), HeaderValue::F32(1.5));
        assert_eq!(
            h("k=decimal:1.50"),
            HeaderValue::Decimal {
                scale: 2,
                value: 150
            }
        );
        assert_eq!(
            h("k=byte-array:AQI="),
            HeaderValue::ByteArray(Bytes::from_static(&[1, 2]))
        );
        assert_eq!(h("k=void:"), HeaderValue::Void);
        assert_eq!(
            h(r#"k=table:{"a":1,"b":{"c":"x"}}"#),
            HeaderValue::Table(vec![
                ("a".into(), HeaderValue::I64(1)),
                (
                    "b".into(),
                    HeaderValue::Table(vec![("c".into(), HeaderValue::String("x".into()))])
                ),
            ])
        );
        let e = parse_header("k=int8:300").unwrap_err();
        assert!(e.contains("int8") && e.contains("300"), "{e}");
    }

    #[test]
    fn properties_are_set_by_name_and_bad_ones_are_named() {
        let mut p = MessageProperties::default();
        for (n, v) in [
            ("reply-to", "r"),
            ("priority", "4"),
            ("delivery-mode", "transient"),
            ("type", "t"),
        ] {
            set_property(&mut p, n, v).unwrap();
        }
        assert_eq!(
            (
                p.reply_to.as_deref(),
                p.priority,
                p.delivery_mode,
                p.kind.as_deref()
            ),
            (Some("r"), Some(4), Some(1), Some("t"))
        );
        assert!(
            set_property(&mut p, "priority", "high")
                .unwrap_err()
                .contains("priority")
        );
        assert!(
            set_property(&mut p, "colour", "red")
                .unwrap_err()
                .contains("unknown property")
        );
    }
}
