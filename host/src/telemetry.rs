//! Logs, the metrics registry, and W3C trace context. A leaf: every other
//! module only uses `tracing` and `metrics` macros, and the trace-context
//! type below.
//!
//! Metric names live next to the code that emits them, each module in one
//! place: `amqp::metrics`, `buffer::metric`, `dispatch::metric` and
//! `admin::metric` (the gauges sampled when `/metrics` is scraped).

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// `[telemetry]`: logs and trace export.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Filter when `RUST_LOG` is unset, e.g. `info` or `warren=debug`.
    pub log_level: String,
    /// OTLP/HTTP (protobuf) traces endpoint, e.g.
    /// `http://127.0.0.1:4318/v1/traces`: each delivery's span is exported
    /// there. Off when unset (the default); plain `http://` only.
    #[serde(serialize_with = "crate::secret::redacted_opt_url")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces exported; a delivery whose `traceparent`
    /// says sampled (or not) follows its parent.
    pub otlp_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.otlp_endpoint
            && !e.starts_with("http://")
        {
            out.push(format!(
                "telemetry.otlp-endpoint {:?} must start with http://",
                crate::secret::redact_url(e)
            ));
        }
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            out.push("telemetry.otlp-sample-ratio must be between 0 and 1".into());
        }
        out
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Install the global subscriber: lines to stderr, filtered by `RUST_LOG`
/// when set, else by `default_filter` (e.g. `info`). Calling it twice is
/// harmless (the second call does nothing).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let _ = init(format, default_filter, None);
}

/// Where delivery spans are exported (OTLP over HTTP, protobuf).
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// Fraction of new traces sampled; children follow their parent.
    pub sample_ratio: f64,
    /// `service.instance.id`: this host's id.
    pub instance_id: String,
}

/// The traces endpoint: `configured` (`telemetry.otlp-endpoint`), else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended, as the
/// OpenTelemetry specification has exporters do. `env` reads a variable.
pub fn otlp_endpoint(
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    configured
        .map(str::to_owned)
        .or_else(|| set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| {
            set("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        })
}

/// Why trace export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up OTLP trace export to {endpoint}: {message}")]
pub struct TelemetryError {
    pub endpoint: String,
    pub message: String,
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet
/// exported.
#[must_use]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warren: flushing trace export failed: {e}");
        }
    }
}

/// Whether delivery spans are exported (their ids then come from the
/// exporter's spans, see [`exported_context`]).
static OTLP: AtomicBool = AtomicBool::new(false);

/// Logging as [`init_logging`], plus, with `otlp`, an OpenTelemetry layer
/// exporting the delivery spans (target `warren::dispatch`). Call before
/// starting an async runtime (the exporter's HTTP client is blocking and
/// runs on the batch processor's own thread).
pub fn init(
    format: LogFormat,
    default_filter: &str,
    otlp: Option<&OtlpConfig>,
) -> Result<TelemetryGuard, TelemetryError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.to_owned());
    let mut filter =
        EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new(default_filter));
    // lapin's own lines reach the log through `LapinLevels`, at Warren's
    // levels; unless the operator asked for lapin by name.
    let relevel_lapin = !directives.contains("lapin");
    if relevel_lapin && let Ok(off) = "lapin=off".parse() {
        filter = filter.add_directive(off);
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let mut provider = None;
    let otel = match otlp {
        None => None,
        Some(o) => {
            let fail = |e: &dyn std::fmt::Display| TelemetryError {
                endpoint: o.endpoint.clone(),
                message: e.to_string(),
            };
            install_tls_provider();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(o.endpoint.clone())
                .build()
                .map_err(|e| fail(&e))?;
            let p = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    o.sample_ratio,
                ))))
                .with_resource(resource(o))
                .build();
            let tracer = p.tracer("warren");
            provider = Some(p);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter_fn(|m| {
                        m.target().starts_with("warren::telemetry")
                            || m.target().starts_with("warren::dispatch")
                            || m.target().starts_with("warren::plugins::outbound")
                    })),
            )
        }
    };
    let lapin = relevel_lapin
        .then(LapinLevels::start)
        .flatten()
        .map(|layer| {
            layer.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("lapin", tracing::Level::INFO)
                    .with_target("amq_protocol", tracing::Level::INFO),
            )
        });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(lapin)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        OTLP.store(true, Ordering::SeqCst);
    }
    Ok(TelemetryGuard { provider })
}

/// Re-emits lapin's INFO, WARN and ERROR lines at DEBUG, target
/// `warren::amqp::lapin`. lapin logs ERROR for what Warren handles as
/// routine (a reset connection, a channel closed by a refusal), and
/// Warren's own supervisor reports each such event once at its level
/// (WARN when a session is lost, INFO while reconnecting); an alert on
/// ERROR must not fire at every broker restart.
///
/// The lines are re-emitted on a thread of their own: an event emitted
/// from inside a layer's `on_event` would re-enter the per-layer filters'
/// thread-local state of the event being dispatched. A full queue drops
/// lines rather than block lapin's I/O.
struct LapinLevels {
    lines: std::sync::mpsc::SyncSender<(&'static str, tracing::Level, String)>,
}

impl LapinLevels {
    /// The layer and its thread; `None` when the thread cannot start
    /// (then lapin's lines are not shown at all).
    fn start() -> Option<Self> {
        let (lines, rx) =
            std::sync::mpsc::sync_channel::<(&'static str, tracing::Level, String)>(1024);
        std::thread::Builder::new()
            .name("warren-lapin-log".into())
            .spawn(move || {
                // Ends when the layer (the sender) is dropped.
                for (target, level, text) in rx {
                    tracing::debug!(target: "warren::amqp::lapin", lapin_target = target, lapin_level = %level, "{text}");
                }
            })
            .ok()?;
        Some(Self { lines })
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LapinLevels {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        let mut text = LapinText::default();
        event.record(&mut text);
        let _ = self.lines.try_send((meta.target(), *meta.level(), text.0));
    }
}

/// An event's message and fields as one line.
#[derive(Default)]
struct LapinText(String);

impl tracing::field::Visit for LapinText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

/// The exported spans' resource: `service.name` from `OTEL_SERVICE_NAME`
/// or `OTEL_RESOURCE_ATTRIBUTES` (the SDK reads both), else `warren`;
/// `service.version` and `service.instance.id` always.
fn resource(o: &OtlpConfig) -> opentelemetry_sdk::Resource {
    use opentelemetry::KeyValue;
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let mut b = opentelemetry_sdk::Resource::builder();
    if !named {
        b = b.with_service_name("warren");
    }
    b.with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", o.instance_id.clone()),
    ])
    .build()
}

/// The span of one delivery, by OpenTelemetry's messaging conventions:
/// `process <queue>`, kind CONSUMER, with the delivery's attributes and
/// the plugin's name and version. Its `outcome`, `trace_id` and `span_id`
/// fields are recorded later (for logs).
pub fn process_span(d: &Delivered<'_>) -> tracing::Span {
    let span = tracing::debug_span!(
        "process",
        "otel.name" = %format_args!("process {}", d.queue),
        "otel.kind" = "consumer",
        "messaging.system" = "rabbitmq",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = d.queue,
        "messaging.rabbitmq.destination.routing_key" = d.routing_key,
        "messaging.rabbitmq.message.delivery_tag" = d.delivery_tag,
        "messaging.message.id" = tracing::field::Empty,
        "messaging.message.body.size" = d.body_size,
        "warren.exchange" = d.exchange,
        "warren.plugin.name" = d.plugin,
        "warren.plugin.version" = d.plugin_version,
        "warren.dedup" = tracing::field::Empty,
        outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(id) = d.message_id {
        span.record("messaging.message.id", id);
    }
    span
}

/// What [`process_span`] describes.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub delivery_tag: u64,
    pub message_id: Option<&'a str>,
    pub body_size: usize,
    pub plugin: &'a str,
    pub plugin_version: &'a str,
}

/// The span of one publish: `publish <exchange>` (`amq.default` for the
/// default exchange, whose name is empty), kind PRODUCER. A child of
/// `parent` (a delivery's span), or a root (`None`), which
/// [`drain_publish_span`] links to the span that first published it.
pub fn publish_span(
    parent: Option<tracing::Id>,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
) -> tracing::Span {
    let shown = if exchange.is_empty() {
        "amq.default"
    } else {
        exchange
    };
    let span = tracing::debug_span!(
        parent: parent,
        "publish",
        "otel.name" = %format_args!("publish {shown}"),
        "otel.kind" = "producer",
        "messaging.system" = "rabbitmq",
        "messaging.operation.type" = "send",
        "messaging.destination.name" = exchange,
        "messaging.rabbitmq.destination.routing_key" = routing_key,
        "messaging.message.id" = tracing::field::Empty,
        "warren.placement" = tracing::field::Empty,
    );
    if let Some(id) = message_id {
        span.record("messaging.message.id", id);
    }
    span
}

/// The span of publishing `m` again from the spool: a root `publish`
/// span linked to the span whose context `m` carries (the publish span of
/// the delivery that spooled it).
pub fn drain_publish_span(m: &crate::message::OutboundMessage) -> tracing::Span {
    let span = publish_span(
        None,
        &m.exchange,
        &m.routing_key,
        m.properties.message_id.as_deref(),
    );
    if !span.is_disabled() {
        span.record("warren.placement", "drained");
        let header = |name| {
            m.properties
                .header(name)
                .and_then(crate::message::HeaderValue::as_str)
        };
        if let Some(tp) = header("traceparent").and_then(TraceContext::parse) {
            link(&span, &tp, header("tracestate"));
        }
    }
    span
}

/// Mark `span` failed: error status with `message`, `error.type` =
/// `error_type` (a low-cardinality class). A no-op when export is off.
pub fn set_error(span: &tracing::Span, error_type: &str, message: &str) {
    if !OTLP.load(Ordering::Relaxed) || span.is_disabled() {
        return;
    }
    span.set_attribute("error.type", error_type.to_owned());
    span.set_status(opentelemetry::trace::Status::error(message.to_owned()));
}

/// Link `span` to the span whose context is `to` (with its `tracestate`).
/// A no-op when export is off.
pub fn link(span: &tracing::Span, to: &TraceContext, tracestate: Option<&str>) {
    if !OTLP.load(Ordering::Relaxed) || span.is_disabled() {
        return;
    }
    span.add_link(remote_context(to, tracestate));
}

fn remote_context(p: &TraceContext, tracestate: Option<&str>) -> SpanContext {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from(p.trace_id),
        SpanId::from(p.span_id),
        TraceFlags::new(p.flags),
        true,
        state,
    )
}

/// The context outputs of `span` carry: with trace export on, the
/// exported span's; else a child of `parent` with an id of its own.
pub fn span_context(
    span: &tracing::Span,
    parent: Option<&TraceContext>,
    tracestate: Option<&str>,
) -> TraceContext {
    exported_context(span, parent, tracestate).unwrap_or_else(|| TraceContext::child_of(parent))
}

/// With trace export on: make `span` a child of `parent` (a remote span
/// context, with its `tracestate`) when given, and return the context of
/// the exported span (its ids are what outputs must carry). `None` when
/// export is off or the span is disabled.
pub fn exported_context(
    span: &tracing::Span,
    parent: Option<&TraceContext>,
    tracestate: Option<&str>,
) -> Option<TraceContext> {
    if !OTLP.load(Ordering::Relaxed) || span.is_disabled() {
        return None;
    }
    if let Some(p) = parent {
        let remote = remote_context(p, tracestate);
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_valid().then(|| TraceContext {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
    })
}

/// Histogram buckets, in seconds: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide Prometheus recorder, once; later calls (tests
/// start several apps in one process) return the same handle. `None` when
/// another recorder was installed first: then `/metrics` says so.
pub fn install_metrics() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new().set_buckets(SECONDS_BUCKETS) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "Invalid histogram buckets; using summaries.");
                    PrometheusBuilder::new()
                }
            };
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot install the Prometheus recorder; /metrics is unavailable.");
                    None
                }
            }
        })
        .clone()
}

/// A W3C trace context (`traceparent`, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceContext {
    /// Parse a `traceparent` value. Only version 00 fields are read (a
    /// later version is read as 00, as the spec asks); all-zero ids and
    /// malformed values give `None`.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2
            || version.eq_ignore_ascii_case("ff")
            || (version == "00" && parts.next().is_some())
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if ![version, trace, span, flags].iter().all(|s| lower_hex(s)) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A child of `parent` (same trace, new span id), or the root of a new
    /// sampled trace.
    pub fn child_of(parent: Option<&TraceContext>) -> TraceContext {
        let span_id = nonzero(rand::random::<u64>);
        match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                flags: p.flags,
            },
            None => TraceContext {
                trace_id: nonzero(rand::random::<u128>),
                span_id,
                flags: 1,
            },
        }
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        let _ = write!(
            s,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        );
        s
    }

    /// The trace id as 32 hex digits (for logs).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits (for logs).
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

fn nonzero<T: PartialEq + Default>(mut f: impl FnMut() -> T) -> T {
    loop {
        let v = f();
        if v != T::default() {
            return v;
        }
    }
}

/// Make ring the process's rustls provider, once. The exporter's HTTP
/// client is built by reqwest, whose TLS is compiled without a provider
/// of its own (the plugins' client is given a full TLS config instead):
/// without a process default it panics when built. ring, as everywhere
/// else in the host; its deprecation only notes that it lacks
/// post-quantum key exchange. A provider installed first is kept.
fn install_tls_provider() {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.traceparent(), EXAMPLE);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_new_span() {
        let parent = TraceContext::parse(EXAMPLE).unwrap();
        let child = TraceContext::child_of(Some(&parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.flags, parent.flags);
        let root = TraceContext::child_of(None);
        assert_ne!(root.trace_id, 0);
        assert_eq!(TraceContext::parse(&root.traceparent()), Some(root));
    }
}
