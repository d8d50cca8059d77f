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
    /// A text header, `key=value`; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub headers: Vec<(String, String)>,
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
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn runtime() -> Result<PluginRuntime, ExitCode> {
    PluginRuntime::new(RuntimeConfig::default()).map_err(|e| {
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
            max_concurrency: None,
        },
        config: args.config.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let plugin = match rt.load_file(&args.file, &settings).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut properties = MessageProperties {
        content_type: args.content_type.clone(),
        ..MessageProperties::default()
    };
    for (k, v) in &args.headers {
        properties.set_header(k.clone(), HeaderValue::String(v.clone()));
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
    let outcome = plugin.invoke(&delivery).await;
    print_json(&outcome_json(
        plugin.path(),
        plugin.name(),
        plugin.version(),
        &outcome,
    ));
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
        Outcome::Ack { outputs } => {
            v["outcome"] = json!("ack");
            v["outputs"] = Value::Array(outputs.iter().map(output_json).collect());
        }
        Outcome::Retry { reason } => {
            v["outcome"] = json!("retry");
            v["reason"] = json!(reason);
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
