//! A stand-in OTLP/HTTP collector: it answers 200 to every request and
//! decodes each body as an `ExportTraceServiceRequest` (protobuf), so a
//! test reads the spans a Warren process exported as they were sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

/// The collector: its port, and the requests received so far.
pub struct Collector {
    pub port: u16,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Collector {
    /// Listen on a free loopback port, on a thread of its own (it ends
    /// with the process).
    pub fn start() -> Result<Collector> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                serve(stream, &keep);
            }
        });
        Ok(Collector { port, bodies })
    }

    /// `http://127.0.0.1:<port>/v1/traces`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received, with the resource it came with.
    pub fn spans(&self) -> Result<Vec<(Resource, Span)>> {
        let bodies = self
            .bodies
            .lock()
            .map_err(|_| anyhow::anyhow!("collector lock poisoned"))?
            .clone();
        let mut out = Vec::new();
        for body in bodies {
            let request = ExportTraceServiceRequest::decode(body.as_slice())
                .context("an OTLP body that is not an ExportTraceServiceRequest")?;
            for rs in request.resource_spans {
                let resource = rs.resource.unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push((resource.clone(), span));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Read requests off one connection (keep-alive) until it closes.
fn serve(stream: std::net::TcpStream, keep: &Mutex<Vec<Vec<u8>>>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut stream = stream;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(mut bodies) = keep.lock() {
            bodies.push(body);
        }
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// Attribute `key` of `attributes`, as text (numbers and booleans
/// formatted).
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    text(value)
}

fn text(v: &AnyValue) -> Option<String> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// Lowercase hex of an id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
